//! Webhooks in a cluster: the events stream (`events_stream`, written by
//! the script that orders each channel) POSTed to the backend as a single
//! node's webhooks are, by one node at a time. Each node runs this thread;
//! the one holding a lease in Redis (`<stream>:webhook`, renewed every
//! second, taken over by another node within [`LEASE_MS`] of its holder's
//! death) reads the stream with the consumer group `corecast-webhook`, one
//! batch at a time and in order, and acknowledges a batch once the backend
//! answered it with a 2xx. Every node reads as the same consumer, so a new
//! holder first delivers what the old one read and did not see taken
//! (at least once; the backend de-duplicates). The nodes' trims keep what
//! the group has not acknowledged.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use redis::Value;

use crate::config::WebhookConfig;
use crate::event_outbox::WebhookMetrics;
use crate::http_client::{Client, Url};
use crate::node::Node;
use crate::webhook::{pause, Backoff};

/// The consumer group (and its one consumer) the nodes read with.
pub const GROUP: &str = "corecast-webhook";
const CONSUMER: &str = "webhook";
/// How long a lease outlives its last renewal.
pub const LEASE_MS: u64 = 5000;

/// Renews the lease if this node holds it, or takes it if no one does.
const LEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
";

/// Starts the relay's thread; it ends when the node drains.
pub fn spawn(
    node: Arc<Node>,
    metrics: Arc<WebhookMetrics>,
    config: WebhookConfig,
    redis_url: String,
    stream: String,
    node_id: u64,
) -> std::io::Result<JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new()
        .name("corecast-webhook".into())
        .spawn(move || {
            let me = format!("{node_id:016x}");
            relay(&node, &metrics, &config, &redis_url, &stream, &me);
            Ok(())
        })
}

fn relay(
    node: &Node,
    m: &WebhookMetrics,
    config: &WebhookConfig,
    redis_url: &str,
    stream: &str,
    me: &str,
) {
    let url = Url::parse(&config.url).expect("checked by the config");
    let mut client = Client::new(url, Duration::from_millis(config.timeout_ms));
    let lease_key = format!("{stream}:webhook");
    let lease = redis::Script::new(LEASE);
    let mut backoff = Backoff::new(config.retry_max_ms);
    let mut body = Vec::new();
    let throttle = crate::logs::Throttle::default();
    let mut conn: Option<redis::Connection> = None;
    while !node.is_draining() {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match open(redis_url, stream) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if throttle.allow(crate::clock::now_ms()).is_some() {
                        tracing::warn!(error = %e, "webhook relay: cannot reach Redis");
                    }
                    pause(node, Duration::from_secs(1));
                    continue;
                }
            },
        };
        let held: redis::RedisResult<i64> = lease.key(&lease_key).arg(me).arg(LEASE_MS).invoke(c);
        m.leader.set(matches!(held, Ok(1)) as u64);
        match held {
            Ok(1) => {}
            Ok(_) => {
                // Another node delivers.
                pause(node, Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook relay: lost Redis");
                conn = None;
                pause(node, Duration::from_secs(1));
                continue;
            }
        }
        // What this consumer read and did not see taken comes first.
        let batch = match read(c, stream, config.batch_events, "0").and_then(|b| {
            if b.is_empty() {
                read(c, stream, config.batch_events, ">")
            } else {
                Ok(b)
            }
        }) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "webhook relay: cannot read the stream");
                conn = None;
                pause(node, Duration::from_secs(1));
                continue;
            }
        };
        if batch.is_empty() {
            continue;
        }
        let lines: Vec<u8> = batch
            .iter()
            .flat_map(|(_, line)| line.iter().copied().chain(std::iter::once(b'\n')))
            .collect();
        crate::webhook::body(&lines, &mut body);
        let failed =
            match crate::webhook::post_batch(&mut client, &config.secret, batch.len(), &body, m) {
                Ok(()) => {
                    let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
                    let acked: redis::RedisResult<i64> =
                        redis::cmd("XACK").arg(stream).arg(GROUP).arg(&ids).query(c);
                    if let Err(e) = acked {
                        // Delivered again by whoever reads next: at least once.
                        tracing::warn!(error = %e, "webhook relay: cannot acknowledge a batch");
                        conn = None;
                    }
                    backoff.reset();
                    None
                }
                Err(why) => Some(why),
            };
        if let Some(why) = failed {
            m.failures.inc();
            if let Some(left_out) = throttle.allow(crate::clock::now_ms()) {
                tracing::warn!(url = %config.url, error = %why, events = batch.len(),
                    retry_in_ms = backoff.wait().as_millis() as u64, failures_left_out = left_out,
                    "webhook relay: the backend did not take a batch; it is kept and tried again");
            }
            backoff.pause(node);
        }
    }
}

/// A connection, and the consumer group made if it is not there yet.
fn open(redis_url: &str, stream: &str) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(redis_url)?;
    let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.set_write_timeout(Some(Duration::from_secs(5)))?;
    let made: redis::RedisResult<Value> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut c);
    match made {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(e),
        _ => Ok(c),
    }
}

/// Up to `count` entries of the stream for this consumer: its pending
/// ones (`from` "0") or new ones (">", waiting up to a second); each its
/// id and its `event` field.
fn read(
    c: &mut redis::Connection,
    stream: &str,
    count: usize,
    from: &str,
) -> redis::RedisResult<Vec<(String, Vec<u8>)>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(CONSUMER)
        .arg("COUNT")
        .arg(count);
    if from == ">" {
        cmd.arg("BLOCK").arg(1000);
    }
    let reply: Option<redis::streams::StreamReadReply> =
        cmd.arg("STREAMS").arg(stream).arg(from).query(c)?;
    Ok(reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .filter_map(|e| {
            let line: Vec<u8> = e.get("event")?;
            Some((e.id, line))
        })
        .collect())
}
