//! Micro-benchmarks of the hot path: frame decode (parse + unmask), frame
//! encode, envelope parse (simd-json in place against serde_json), binary
//! envelope decode, and fan-out of one message to 1,000 local members.

use std::cell::Cell;
use std::hint::black_box;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use corecast::internals::access::Access;
use corecast::internals::engine::limits::{Limit, RateLimits};
use corecast::internals::engine::{
    ConnId, Engine, Member, MeshMsg, MeshTx, Outbound, SessionId, Settings, ShardId,
};
use corecast::internals::metrics::ShardMetrics;
use corecast::protocol::{
    binary, json, ChannelJoin, ClientEvent, ClientMessage, DeviceKind, MessageSend, Protocol,
};
use corecast::ws::frame::{encode, encode_masked};
use corecast::ws::{Decoder, OpCode};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const SIZES: [usize; 4] = [16, 128, 1024, 16 * 1024];

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in SIZES {
        let payload = vec![b'a'; size];
        let wire = encode_masked(true, OpCode::Binary, &payload, [1, 2, 3, 4]);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("decode/{size}"), |b| {
            let mut d = Decoder::new();
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut src| black_box(d.decode(&mut src, 1 << 20).unwrap()),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("encode/{size}"), |b| {
            b.iter(|| black_box(encode(OpCode::Text, black_box(&payload))))
        });
    }
    g.finish();
}

fn envelopes(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope");
    let text = br#"{"t":"message:send","id":42,"d":{"channelId":"general","content":"hello there, how is everyone doing today?","replyTo":"0123456789abcdef-17"}}"#;
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("json/simd-json", |b| {
        let mut scratch = json::Scratch::default();
        let mut buf = text.to_vec();
        b.iter(|| {
            buf.copy_from_slice(text);
            black_box(json::decode_client(&mut buf, &mut scratch).unwrap())
        })
    });
    g.bench_function("json/serde_json", |b| {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Env<'a> {
            t: &'a str,
            id: Option<u64>,
            d: MessageSend,
        }
        b.iter(|| black_box(serde_json::from_slice::<Env>(black_box(text)).unwrap()))
    });
    let msg = ClientMessage {
        id: Some(42),
        event: ClientEvent::MessageSend(MessageSend {
            channel_id: "general".into(),
            content: "hello there, how is everyone doing today?".into(),
            reply_to: Some("0123456789abcdef-17".into()),
            ..MessageSend::new("", "")
        }),
    };
    let archived = binary::encode_client(&msg);
    g.bench_function("binary/rkyv", |b| {
        b.iter(|| black_box(binary::decode_client(black_box(&archived)).unwrap()))
    });
    g.finish();
}

/// An outbound queue that only counts: what is measured is the engine's
/// side of a delivery (lookup and refcount increment).
#[derive(Clone)]
struct Count(std::rc::Rc<Cell<u64>>);

impl Outbound for Count {
    fn push(&self, frame: &Bytes) -> bool {
        black_box(frame.clone());
        self.0.set(self.0.get() + 1);
        true
    }

    fn close(&self, _: u16, _: &str) {
        unreachable!("nothing is closed here")
    }

    fn admitted(&self) {}

    fn refused(&self, _: &str) {
        unreachable!("one connection per user here")
    }
}

struct NoMesh;

impl MeshTx for NoMesh {
    fn send(&mut self, _: ShardId, _: MeshMsg) {
        unreachable!("single shard")
    }
}

/// A shard with `members` local members of `room`, every one a user of
/// its own; with rate limits (high enough never to refuse here) or
/// without.
fn room(members: u64, limits: bool) -> (Engine<Count>, Vec<ConnId>, Count) {
    let mut rate_limits = RateLimits::default();
    rate_limits.set("*", None).unwrap();
    if limits {
        rate_limits
            .set("*", Limit::parse("1000000000/1ms").unwrap())
            .unwrap();
    }
    let settings = Settings {
        rate_limits,
        ..Settings::default()
    };
    let mut e = Engine::new(0, 1, settings, Arc::new(ShardMetrics::default()), 1);
    let counter = Count(std::rc::Rc::new(Cell::new(0)));
    let mut ids = Vec::new();
    for i in 0..members {
        let m = Member {
            user: format!("u{i}").into(),
            session: SessionId(1, i),
            protocol: Protocol::Json,
        };
        let id = e.open(
            counter.clone(),
            m,
            DeviceKind::Web,
            Access::default(),
            0,
            &mut NoMesh,
        );
        e.handle(
            id,
            ClientMessage {
                id: None,
                event: ClientEvent::ChannelJoin(ChannelJoin::new("room")),
            },
            0,
            &mut NoMesh,
        );
        ids.push(id);
    }
    (e, ids, counter)
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for (members, limits, name) in [
        (1000, true, "publish_to_1000_local_members"),
        (10, true, "publish_to_10_local_members/rate_limits_on"),
        (10, false, "publish_to_10_local_members/rate_limits_off"),
    ] {
        let (mut e, ids, counter) = room(members, limits);
        g.throughput(Throughput::Elements(members));
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = ClientMessage {
                    id: Some(1),
                    event: ClientEvent::MessageSend(MessageSend::new("room", "hello")),
                };
                e.handle(ids[0], m, 0, &mut NoMesh);
            })
        });
        // Publishes are still delivered after the run: no limit refused them.
        let before = counter.0.get();
        let m = ClientMessage {
            id: Some(1),
            event: ClientEvent::MessageSend(MessageSend::new("room", "hello")),
        };
        e.handle(ids[0], m, 0, &mut NoMesh);
        assert!(
            counter.0.get() - before > members,
            "{name}: a publish was refused"
        );
    }
    g.finish();
}

criterion_group!(benches, frames, envelopes, fanout);
criterion_main!(benches);
