//! A first fan-out load: C channels × M members on a running corecast node,
//! one publisher per channel, an aggregate publish rate for T seconds.
//! Reports deliveries/s, loss, latency percentiles and, given the server's
//! PID, the server's CPU time per delivery (from /proc/PID/stat).
//!
//!     cargo run --release --example fanout -- ADDR [CHANNELS] [MEMBERS] [RATE] [SECONDS] [SERVER_PID]
//!
//! The server must run in development mode (it mints dev tokens). Pin the
//! server and this tool to different cores with `taskset`. This tool does
//! not answer pings: keep a run (connecting included) shorter than the
//! server's ping interval plus ping timeout (45 s by default). Every join is
//! announced to the channel's members, so connecting M members costs M²/2
//! `channel:member_joined` frames per channel.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use corecast::ws::frame::{encode_masked, parse_header};
use corecast::ws::OpCode;

struct Stats {
    received: Cell<u64>,
    latencies_us: RefCell<Vec<u32>>,
    counting: Cell<bool>,
}

fn clock_ticks() -> f64 {
    100.0
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

async fn connect(addr: SocketAddr, user: &str) -> (TcpStream, Vec<u8>) {
    let token = corecast::auth::mint(&Default::default(), user, 3600, None, now_s()).unwrap();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).unwrap();
    let req = format!(
        "GET /ws?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (r, _) = s.write_all(req.into_bytes()).await;
    r.unwrap();
    let mut buf = Vec::new();
    loop {
        let (r, b) = s.read(vec![0u8; 4096]).await;
        let n = r.unwrap();
        assert!(n > 0, "closed during handshake");
        buf.extend_from_slice(&b[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(buf.starts_with(b"HTTP/1.1 101"));
            buf.drain(..p + 4);
            return (s, buf);
        }
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Reads frames; after `counting` starts, counts `message:new` and samples
/// latency from the publish time carried in the content.
async fn reader<R: AsyncReadRent>(
    mut rd: R,
    mut buf: Vec<u8>,
    stats: Rc<Stats>,
    start: Instant,
    joined: Rc<Cell<u32>>,
) {
    let mut tmp = vec![0u8; 64 * 1024];
    let mut sample = 0u32;
    loop {
        while let Ok(Some(h)) = parse_header(&buf) {
            let total = h.header_len + h.payload_len as usize;
            if buf.len() < total {
                break;
            }
            let p = &buf[h.header_len..total];
            if h.opcode == OpCode::Text {
                if p.starts_with(br#"{"t":"message:new""#) {
                    if stats.counting.get() {
                        stats.received.set(stats.received.get() + 1);
                        sample += 1;
                        if sample % 16 == 0 {
                            if let Some(sent) = sent_us(p) {
                                let now = start.elapsed().as_micros() as u64;
                                stats
                                    .latencies_us
                                    .borrow_mut()
                                    .push(now.saturating_sub(sent) as u32);
                            }
                        }
                    }
                } else if p.starts_with(br#"{"t":"ack""#) && p.windows(7).any(|w| w == b"\"epoch\"")
                {
                    joined.set(joined.get() + 1);
                }
            }
            buf.drain(..total);
        }
        let (r, t) = rd.read(tmp).await;
        tmp = t;
        match r {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Connects as `user`, joins channel `ch{c}`, starts the reader, and returns
/// the write half.
async fn join_channel(
    addr: SocketAddr,
    user: &str,
    c: usize,
    stats: Rc<Stats>,
    start: Instant,
    joined: Rc<Cell<u32>>,
) -> monoio::io::OwnedWriteHalf<TcpStream> {
    let (s, rest) = connect(addr, user).await;
    let (rd, mut wr) = s.into_split();
    let join = frame(&format!(
        r#"{{"t":"channel:join","id":1,"d":{{"channelId":"ch{c}"}}}}"#
    ));
    let (r, _) = wr.write_all(join).await;
    r.unwrap();
    monoio::spawn(reader(rd, rest, stats, start, joined));
    wr
}

fn sent_us(p: &[u8]) -> Option<u64> {
    let key = br#""content":"t"#;
    let at = p.windows(key.len()).position(|w| w == key)? + key.len();
    let end = p[at..].iter().position(|b| !b.is_ascii_digit())? + at;
    std::str::from_utf8(&p[at..end]).ok()?.parse().ok()
}

fn frame(v: &str) -> Vec<u8> {
    encode_masked(true, OpCode::Text, v.as_bytes(), [1, 2, 3, 4])
}

fn pct(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q) as usize]
}

fn main() {
    // LOADGEN_DRIVER=epoll runs this tool on epoll instead of io_uring.
    if std::env::var("LOADGEN_DRIVER").as_deref() == Ok("epoll") {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(run());
    } else {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .enable_timer()
            .build()
            .unwrap()
            .block_on(run());
    }
}

async fn run() {
    let a: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = a
        .get(1)
        .map_or("127.0.0.1:8080", |s| s.as_str())
        .parse()
        .unwrap();
    let channels: usize = a.get(2).map_or(10, |s| s.parse().unwrap());
    let members: usize = a.get(3).map_or(100, |s| s.parse().unwrap());
    let rate: u64 = a.get(4).map_or(1000, |s| s.parse().unwrap());
    let seconds: u64 = a.get(5).map_or(10, |s| s.parse().unwrap());
    let pid: Option<u32> = a.get(6).map(|s| s.parse().unwrap());
    let start = Instant::now();
    let stats = Rc::new(Stats {
        received: Cell::new(0),
        latencies_us: RefCell::new(Vec::new()),
        counting: Cell::new(false),
    });
    let joined = Rc::new(Cell::new(0u32));
    eprintln!("opening {} subscriber connections", channels * members);
    // Write halves of the subscribers, kept so their connections stay open.
    let mut writers = Vec::with_capacity(channels * members);
    for c in 0..channels {
        for m in 0..members {
            let user = format!("sub-{c}-{m}");
            writers.push(join_channel(addr, &user, c, stats.clone(), start, joined.clone()).await);
        }
    }
    let mut pubs = Vec::new();
    for c in 0..channels {
        // The publisher's own deliveries are read and not counted.
        let quiet = Rc::new(Stats {
            received: Cell::new(0),
            latencies_us: RefCell::new(Vec::new()),
            counting: Cell::new(false),
        });
        pubs.push(join_channel(addr, &format!("pub-{c}"), c, quiet, start, joined.clone()).await);
    }
    let want = (channels * (members + 1)) as u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined.get() < want {
        assert!(
            Instant::now() < deadline,
            "only {} of {want} joins acknowledged",
            joined.get()
        );
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    monoio::time::sleep(Duration::from_millis(300)).await;
    eprintln!("all joined; publishing {rate} msgs/s for {seconds} s");
    stats.counting.set(true);
    let cpu0 = pid.and_then(cpu_seconds);
    let t0 = Instant::now();
    let mut published = 0u64;
    let run = Duration::from_secs(seconds);
    let mut next_report = Duration::from_secs(1);
    while t0.elapsed() < run {
        let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
        while published < due {
            let c = (published % channels as u64) as usize;
            let sent = start.elapsed().as_micros();
            let f = frame(&format!(
                r#"{{"t":"message:send","d":{{"channelId":"ch{c}","content":"t{sent}"}}}}"#
            ));
            let (r, _) = pubs[c].write_all(f).await;
            r.unwrap();
            published += 1;
        }
        if t0.elapsed() >= next_report {
            eprintln!(
                "  {:>3} s: published {published}, delivered {}",
                next_report.as_secs(),
                stats.received.get()
            );
            next_report += Duration::from_secs(1);
        }
        monoio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(cpu_seconds);
    // Let in-flight deliveries arrive (bounded).
    let expected = published * members as u64;
    let drain = Instant::now();
    while stats.received.get() < expected && drain.elapsed() < Duration::from_secs(5) {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = stats.received.get();
    let mut lat = stats.latencies_us.borrow().clone();
    lat.sort_unstable();
    let cpu_per_delivery = match (cpu0, cpu1) {
        (Some(a), Some(b)) => format!("{:.3}", (b - a) * 1e6 / received.max(1) as f64),
        _ => "n/a".into(),
    };
    println!(
        "{{\"channels\":{channels},\"members\":{members},\"rate\":{rate},\"seconds\":{elapsed:.2},\"published\":{published},\"expected\":{expected},\"delivered\":{received},\"deliveries_per_s\":{:.0},\"loss\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"server_cpu_us_per_delivery\":\"{cpu_per_delivery}\"}}",
        received as f64 / elapsed,
        expected.saturating_sub(received),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 0.999),
        lat.last().copied().unwrap_or(0)
    );
    drop(writers);
}
