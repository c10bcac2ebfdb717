//! Every accepted socket counts against its address from the accept on;
//! the node keeps headroom below its open-file limit; idle sockets do not
//! lock the backend out of the server API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::*;

/// What the server says on a socket that sent nothing, within `wait`.
fn said(s: &mut TcpStream, wait: Duration) -> String {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

/// A connection from `ip` (any address of 127.0.0.0/8 is loopback).
fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{ip}:0").parse().unwrap();
    sock.bind(&from.into()).unwrap();
    sock.connect(&to.into()).unwrap();
    sock.into()
}

fn idle_sockets_count_from_the_accept(driver: &str) {
    let s = Server::start(&[
        "--shards",
        "2",
        "--io-driver",
        driver,
        "--max-connections-per-ip",
        "50",
    ]);
    let mut idle: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    // A refusal is written at the accept: it has arrived after a moment.
    std::thread::sleep(Duration::from_millis(500));
    let refused = idle
        .iter_mut()
        .map(|c| said(c, Duration::from_millis(10)))
        .filter(|a| a.starts_with("HTTP/1.1 429"))
        .count();
    // At most 50 held (a probe of the harness may still hold one more).
    assert!(
        (30..=31).contains(&refused),
        "{driver}: {refused} of 80 sockets that never sent a request refused"
    );
    // Another address is not held back.
    let mut other = connect_from("127.0.0.2", s.addr);
    other
        .write_all(upgrade_request(&format!("/ws?token={}", token("alice", 600)), "").as_bytes())
        .unwrap();
    let answer = said(&mut other, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 101"), "{driver}: {answer}");
    // Once the idle ones go, the address has its connections back (a
    // request for /metrics is a socket like any other).
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let refused = "corecast_connections_refused_total{reason=\"too_many_connections_from_ip\"}";
    assert!((30..=31).contains(&s.metric(refused)), "{driver}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_ws, ready) = ws_user(&s, "bob").await;
        assert_eq!(ready["t"], "ready");
    });
}

#[test]
fn idle_sockets_count_against_their_address_from_the_accept_io_uring() {
    idle_sockets_count_from_the_accept("io_uring");
}

#[test]
fn idle_sockets_count_against_their_address_from_the_accept_epoll() {
    idle_sockets_count_from_the_accept("epoll");
}

fn the_file_limit_keeps_headroom(driver: &str) {
    raise_nofile();
    let args = one_shard_args(&["--io-driver", driver]);
    let s = Server::start_limited(&args, &[], Some(320));
    // 320 descriptors: 64 + 16 kept for the node, the rest for clients.
    let mut idle: Vec<TcpStream> = (0..400)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let full = idle
        .iter_mut()
        .map(|c| said(c, Duration::from_millis(10)))
        .filter(|a| a.starts_with("HTTP/1.1 503"))
        .count();
    assert!(full >= 150, "{driver}: {full} of 400 refused with 503");
    // A new client is told at once rather than left waiting, and the log
    // holds no flood of failed accepts.
    let mut late = connect_from("127.0.0.3", s.addr);
    let answer = said(&mut late, Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 503"), "{driver}: {answer}");
    assert!(s.log_count("accept failed") <= 2, "{driver}:\n{}", s.log());
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (_ws, ready) = ws_user(&s, "carol").await;
        assert_eq!(ready["t"], "ready");
    });
}

#[test]
fn the_file_limit_keeps_headroom_io_uring() {
    the_file_limit_keeps_headroom("io_uring");
}

#[test]
fn the_file_limit_keeps_headroom_epoll() {
    the_file_limit_keeps_headroom("epoll");
}

#[test]
fn idle_sockets_do_not_lock_the_backend_out_of_the_api() {
    raise_nofile();
    let key = "sockets-test-key-0123456789";
    let s = Server::with_api(key);
    let api = s.api_addr();
    let idle: Vec<TcpStream> = (0..1030)
        .map(|_| TcpStream::connect(api).unwrap())
        .collect();
    // Give the API's thread a moment to take them all.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let (status, v) = api_call(api, "GET", "/api/stats", key, None);
        assert_eq!(status, 200, "{v}");
    }
    drop(idle);
}
