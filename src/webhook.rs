//! The event stream's delivery: a thread of its own reads the outbox
//! ([`crate::event_outbox`]) and POSTs its events to the backend in
//! batches, one at a time and in order, signed with HMAC-SHA256. A batch
//! the backend does not answer with a 2xx is tried again after a wait that
//! doubles from 100 ms to `retry_max_ms`; nothing moves on until it is
//! taken. Batches grow with the load: what comes while one is in flight
//! goes in the next.
//!
//! The request body is `{"events":[EVENT, …]}`, each event one line of the
//! outbox; `X-Corecast-Signature: t=MS,v1=HEX` signs `MS.BODY` (see
//! docs/BACKEND.md).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::WebhookConfig;
use crate::event_outbox::{EventStream, Reader, WebhookMetrics};
use crate::http_client::{Client, Url};
use crate::node::Node;

/// The first wait after a failure.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// The wait before a batch the backend did not take is sent again: from
/// 100 ms, doubling up to `retry_max_ms`, and back to 100 ms once a batch
/// is taken. The webhook thread and the cluster's relay share it.
pub struct Backoff {
    wait: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(retry_max_ms: u64) -> Backoff {
        Backoff {
            wait: RETRY_MIN,
            max: Duration::from_millis(retry_max_ms),
        }
    }

    /// The next wait.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// A batch was taken.
    pub fn reset(&mut self) {
        self.wait = RETRY_MIN;
    }

    /// A batch failed: waits (less when the node drains), and the next wait
    /// doubles.
    pub fn pause(&mut self, node: &Node) {
        pause(node, self.wait);
        self.wait = (self.wait * 2).min(self.max);
    }
}
/// Bytes of events per POST, about (one larger event goes alone).
const BATCH_BYTES: usize = 1 << 20;

/// The signature header's value for `body` sent at `t` (ms).
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let mut out = format!("t={t},v1=");
    for b in mac.finalize().into_bytes() {
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!("{b:02x}"));
    }
    out
}

/// The body of a batch: its lines as a JSON array.
pub fn body(lines: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(lines.len() + 16);
    out.extend_from_slice(b"{\"events\":[");
    // Each line ends in a newline: the newlines become commas, the last
    // one the array's end.
    let start = out.len();
    out.extend_from_slice(lines);
    for i in memchr::memchr_iter(b'\n', &lines[..lines.len().saturating_sub(1)]) {
        out[start + i] = b',';
    }
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    out.extend_from_slice(b"]}");
}

/// When the first event of `lines` was sequenced (its `at`).
fn first_at(lines: &[u8]) -> Option<u64> {
    let line = lines.split(|&b| b == b'\n').next()?;
    let i = memchr::memmem::find(line, b",\"at\":")? + 6;
    let digits = line[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[i..i + digits]).ok()?.parse().ok()
}

/// Starts the delivery thread. It ends when the node drains (what waits
/// is delivered after the next start).
pub fn spawn(
    node: Arc<Node>,
    stream: Arc<EventStream>,
    reader: Reader,
    config: WebhookConfig,
) -> std::io::Result<JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new()
        .name("corecast-webhook".into())
        .spawn(move || {
            run(&node, &stream, reader, &config);
            Ok(())
        })
}

fn run(node: &Node, stream: &EventStream, mut reader: Reader, config: &WebhookConfig) {
    let _ = stream.outbox.reader.set(std::thread::current());
    let url = Url::parse(&config.url).expect("checked by the config");
    let mut client = Client::new(url, Duration::from_millis(config.timeout_ms));
    let mut backoff = Backoff::new(config.retry_max_ms);
    // Sized once for a full batch: grown step by step, each step would be
    // fresh memory for the kernel to zero.
    let mut body_buf = Vec::with_capacity(BATCH_BYTES + (64 << 10));
    let throttle = crate::logs::Throttle::default();
    let m = &stream.metrics;
    loop {
        if node.is_draining() {
            return;
        }
        let batch = match reader.read(config.batch_events, BATCH_BYTES) {
            Ok(b) => b,
            Err(e) => {
                if throttle.allow(crate::clock::now_ms()).is_some() {
                    tracing::error!(error = %e, "webhook: cannot read the outbox");
                }
                pause(node, Duration::from_secs(1));
                continue;
            }
        };
        if batch.events == 0 {
            // Woken by the store when events come.
            std::thread::park_timeout(Duration::from_millis(500));
            continue;
        }
        let (events, end, oldest) = (batch.events, batch.end, first_at(batch.lines));
        body(batch.lines, &mut body_buf);
        let failed = match post_batch(&mut client, &config.secret, events, &body_buf, m) {
            Ok(()) => {
                if let Some(at) = oldest {
                    m.lag_ms.set(crate::clock::now_ms().saturating_sub(at));
                }
                if let Err(e) = reader.delivered(end) {
                    tracing::error!(error = %e, "webhook: cannot move the outbox's cursor");
                }
                backoff.reset();
                None
            }
            Err(why) => Some(why),
        };
        if let Some(why) = failed {
            m.failures.inc();
            if let Some(left_out) = throttle.allow(crate::clock::now_ms()) {
                tracing::warn!(
                    url = %config.url,
                    error = %why,
                    events,
                    waiting_bytes = stream.outbox.waiting(),
                    retry_in_ms = backoff.wait().as_millis() as u64,
                    failures_left_out = left_out,
                    "webhook: the backend did not take a batch; it is kept and tried again"
                );
            }
            backoff.pause(node);
        }
    }
}

/// POSTs a batch of `events` (its `body`), signed; counts it in `m` when
/// the backend took it.
pub fn post_batch(
    client: &mut Client,
    secret: &str,
    events: usize,
    body: &[u8],
    m: &WebhookMetrics,
) -> Result<(), String> {
    let count = events.to_string();
    let started = Instant::now();
    signed_post(
        client,
        secret.as_bytes(),
        &[("X-Corecast-Events", &count)],
        body,
    )?;
    m.request_us.add(started.elapsed().as_micros() as u64);
    m.batches.inc();
    m.delivered.add(events as u64);
    Ok(())
}

/// A POST signed with `X-Corecast-Signature` (and `headers`): the body of
/// a 2xx answer, or why there is none. The webhooks and the hooks send
/// theirs through it.
pub fn signed_post(
    client: &mut Client,
    secret: &[u8],
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let sig = signature(secret, crate::clock::now_ms(), body);
    let mut all = Vec::with_capacity(headers.len() + 1);
    all.push(("X-Corecast-Signature", sig.as_str()));
    all.extend_from_slice(headers);
    match client.post_json(&all, body) {
        Ok(r) if (200..300).contains(&r.status) => Ok(r.body),
        Ok(r) => Err(format!(
            "the backend answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
        )),
        Err(f) => Err(f.to_string()),
    }
}

/// Waits `d` (less when the node drains); new events do not cut it short.
pub fn pause(node: &Node, d: Duration) {
    let until = Instant::now() + d;
    while !node.is_draining() {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::park_timeout((until - now).min(Duration::from_millis(200)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_time_dot_body() {
        // echo -n '1700000000000.{"events":[]}' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            signature(b"0123456789abcdef", 1_700_000_000_000, br#"{"events":[]}"#),
            "t=1700000000000,v1=".to_owned() + &expected_hex()
        );
    }

    fn expected_hex() -> String {
        // Computed independently with Python's hmac module.
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import hmac,hashlib;print(hmac.new(b'0123456789abcdef',b'1700000000000.{\"events\":[]}',hashlib.sha256).hexdigest())",
            ])
            .output()
            .expect("python3 runs");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    #[test]
    fn a_body_is_the_lines_as_an_array() {
        let mut out = Vec::new();
        body(b"{\"a\":1}\n{\"b\":2}\n", &mut out);
        assert_eq!(out, br#"{"events":[{"a":1},{"b":2}]}"#);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
        assert_eq!(
            first_at(
                b"{\"channel\":\"c\",\"epoch\":\"e\",\"offset\":3,\"at\":1234,\"event\":{}}\n"
            ),
            Some(1234)
        );
    }
}
