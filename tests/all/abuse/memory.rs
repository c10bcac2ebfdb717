//! Every byte queued for a peer counts against its bounds; memory follows
//! the bytes a peer sent, not the lengths it announced.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use corecast::ws::frame::encode_masked;
use corecast::ws::OpCode;
use serde_json::json;

use crate::common::*;

/// A connection whose receive buffer is small, so that what the server
/// queues for it stays queued on the server.
fn small_window(addr: std::net::SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

/// A publisher and a member of `ch` on the node's one shard: the member
/// must receive every one of `n` messages, in order, whatever else the
/// shard is doing meanwhile.
async fn others_are_served(s: &Server, ch: &str, n: u64) {
    let mut member = Peer::on(s, "member", 0, "").await;
    let mut publisher = Peer::on(s, "publisher", 0, "").await;
    member.ok("channel:join", json!({"channelId": ch})).await;
    publisher.ok("channel:join", json!({"channelId": ch})).await;
    for i in 0..n {
        publisher
            .ok(
                "message:send",
                json!({"channelId": ch, "content": i.to_string()}),
            )
            .await;
    }
    let mut last = 0;
    for i in 0..n {
        let m = member.event("message:new").await;
        assert_eq!(m["d"]["content"], i.to_string());
        let offset = m["d"]["offset"].as_u64().unwrap();
        assert!(offset > last, "in order");
        last = offset;
    }
}

/// Floods pings (125 bytes each) without reading, until the server stops
/// reading them or `limit` bytes went out; returns the bytes sent.
fn ping_flood(conn: &mut TcpStream, limit: usize) -> usize {
    let ping = encode_masked(true, OpCode::Ping, &[b'p'; 125], [1, 2, 3, 4]);
    let chunk: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 8192)
        .collect();
    conn.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sent = 0;
    while sent < limit {
        match conn.write(&chunk) {
            Ok(n) if n > 0 => sent += n,
            _ => break,
        }
    }
    sent
}

fn pongs_count_against_the_bound(driver: &str) {
    let s = Server::start(&["--shards", "1", "--io-driver", driver]);
    let before = s.rss_kib();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One connection with a token, one without: neither may grow the node.
    for token in [Some(token("flooder", 600)), None] {
        let mut conn = small_window(s.addr);
        let path = token
            .map(|t| format!("/ws?token={t}"))
            .unwrap_or("/ws".into());
        conn.write_all(upgrade_request(&path, "").as_bytes())
            .unwrap();
        let flood = std::thread::spawn(move || {
            let sent = ping_flood(&mut conn, 256 << 20);
            (conn, sent)
        });
        // Meanwhile the shard serves a well-behaved pair, every message in order.
        rt.block_on(others_are_served(&s, "calm", 50));
        let (mut conn, sent) = flood.join().unwrap();
        let grown = s.rss_kib().saturating_sub(before);
        assert!(
            grown < 64 << 10,
            "{driver}: RSS grew {grown} KiB while a peer sent {sent} bytes of pings"
        );
        // The server closed it (1013) and then shut the socket.
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut sink = vec![0u8; 1 << 16];
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match conn.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    assert_eq!(
        s.metric("corecast_slow_consumer_closes_total"),
        2,
        "{}",
        s.log()
    );
}

#[test]
fn pongs_count_against_the_bound_io_uring() {
    pongs_count_against_the_bound("io_uring");
}

#[test]
fn pongs_count_against_the_bound_epoll() {
    pongs_count_against_the_bound("epoll");
}

/// Upgrades of `users` users, each sending a frame header that announces
/// 1 MiB and a few bytes of it, then a few more.
fn announced_but_not_sent(driver: &str) {
    let s = Server::start(&["--shards", "1", "--io-driver", driver]);
    let before = s.rss_kib();
    let mut held = Vec::new();
    for i in 0..150 {
        let mut raw = Raw::connect(
            s.addr,
            &format!("/ws?token={}", token(&format!("u{i}"), 600)),
            "",
        );
        let header = encode_masked(true, OpCode::Binary, &vec![0u8; 1 << 20], [5, 6, 7, 8]);
        raw.send_bytes(&header[..14 + 16]);
        held.push(raw);
    }
    for raw in held.iter_mut() {
        raw.send_bytes(&[1, 2, 3, 4]);
    }
    // A round trip on each makes sure the server read what was sent.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(others_are_served(&s, "calm", 10));
    let grown = s.rss_kib().saturating_sub(before);
    assert!(
        grown < 40 << 10,
        "{driver}: RSS grew {grown} KiB for 150 MiB announced and 3 KiB sent"
    );
}

#[test]
fn memory_follows_the_bytes_received_io_uring() {
    announced_but_not_sent("io_uring");
}

#[test]
fn memory_follows_the_bytes_received_epoll() {
    announced_but_not_sent("epoll");
}
