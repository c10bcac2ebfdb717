//! Cross-core costs: handing a message from one shard to another through
//! the mesh, and verifying a client's JWT (which bounds connects per core).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use corecast::auth::{mint, Verifier};
use corecast::config::AuthConfig;
use corecast::internals::engine::MeshMsg;
use corecast::internals::mesh::Mesh;
use corecast::protocol::Frames;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// Shard 0 (this thread, core 0) hands `Deliver` messages to shard 1 (a
/// thread on core 1 that pops as fast as it can). Measures the producer's
/// time per message until the consumer has taken them all.
fn handoff(c: &mut Criterion) {
    let (mesh, _bells) = Mesh::new(2, 0, 4096).unwrap();
    let mesh = Arc::new(mesh);
    let consumed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (mesh, consumed, stop) = (mesh.clone(), consumed.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = monoio::utils::bind_to_cpu_set([1]);
            while !stop.load(Ordering::Relaxed) {
                let mut n = 0;
                while let Some(m) = mesh.pop(0, 1) {
                    black_box(m);
                    n += 1;
                }
                if n > 0 {
                    consumed.fetch_add(n, Ordering::Release);
                } else {
                    std::hint::spin_loop();
                }
            }
        })
    };
    let _ = monoio::utils::bind_to_cpu_set([0]);
    let channel: Arc<str> = "general".into();
    // Encoded once by the owner, shared by every shard it goes to.
    let frames = Arc::new(Frames {
        json: Some(Bytes::from(vec![b'x'; 128])),
        ..Frames::default()
    });
    let mut g = c.benchmark_group("mesh");
    g.throughput(Throughput::Elements(1));
    g.bench_function("handoff_between_two_pinned_shards", |b| {
        b.iter_custom(|iters| {
            let start_count = consumed.load(Ordering::Acquire);
            let t0 = Instant::now();
            for _ in 0..iters {
                let mut msg = MeshMsg::Deliver {
                    channel: channel.clone(),
                    frames: frames.clone(),
                    offset: 1,
                };
                while let Err(m) = mesh.try_push(0, 1, msg) {
                    msg = m;
                    std::hint::spin_loop();
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while consumed.load(Ordering::Acquire) < start_count + iters {
                assert!(Instant::now() < deadline, "consumer stalled");
                std::hint::spin_loop();
            }
            t0.elapsed()
        })
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    consumer.join().unwrap();
}

/// JWT verification per algorithm, with the test fixture keys.
fn jwt(c: &mut Criterion) {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut g = c.benchmark_group("jwt_verify");
    g.throughput(Throughput::Elements(1));
    for alg in ["HS256", "RS256", "ES256"] {
        let stem = alg.to_ascii_lowercase();
        let cfg = AuthConfig {
            algorithm: alg.into(),
            secret: (alg == "HS256").then(|| "a-benchmark-secret-of-some-length".to_string()),
            public_key_file: (alg != "HS256").then(|| fixtures.join(format!("{stem}.pub.pem"))),
            ..AuthConfig::default()
        };
        let key = (alg != "HS256")
            .then(|| std::fs::read(fixtures.join(format!("{stem}.key.pem"))).unwrap());
        let token = mint(&cfg, "alice", 3600, key.as_deref(), now).unwrap();
        let v = Verifier::from_config(&cfg).unwrap();
        g.bench_function(alg, |b| {
            b.iter(|| black_box(v.verify(black_box(&token)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, handoff, jwt);
criterion_main!(benches);
