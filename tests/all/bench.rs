//! `corecast bench` and the `corecast::client` SDK against real servers:
//! a corecast node (JSON and binary protocols) and the tokio +
//! fastwebsockets baseline (`--protocol raw`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Server, SECRET};
use corecast::client::{Client, ClientError, ConnectOptions};
use corecast::protocol::{ChannelJoin, ClientEvent, ErrorCode, MessageSend, Protocol, ServerEvent};
use serde_json::Value;

/// Runs `corecast bench ARGS`; returns its exit status, JSON lines and
/// stderr.
fn bench(args: &[&str]) -> (bool, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_corecast"))
        .arg("bench")
        .args(args)
        .output()
        .expect("run corecast bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.success(), lines, stderr)
}

fn ok_bench(args: &[&str]) -> (Vec<Value>, String) {
    let (ok, lines, err) = bench(args);
    assert!(ok, "bench failed: {args:?}\n{err}");
    (lines, err)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("`{k}` missing in {v}"))
}

#[test]
fn fanout_counts_every_delivery_in_both_protocols() {
    let s = Server::start(&["--shards", "2"]);
    let url = s.url("/ws");
    let pid = s.child.id().to_string();
    for protocol in ["json", "binary"] {
        let (lines, err) = ok_bench(&[
            "fanout",
            "--url",
            &url,
            "--secret",
            SECRET,
            "--protocol",
            protocol,
            "-r",
            "3",
            "-m",
            "5",
            "-s",
            "300",
            "-t",
            "1",
            "--server-pid",
            &pid,
        ]);
        assert_eq!(lines.len(), 1);
        let r = &lines[0];
        assert_eq!(r["workload"], "fanout");
        assert_eq!(r["protocol"], protocol);
        let published = u(r, "published");
        assert!(published >= 250, "{r}");
        assert_eq!(u(r, "expected"), published * 5);
        assert_eq!(u(r, "delivered"), published * 5, "{r}\n{err}");
        assert_eq!(u(r, "loss"), 0);
        assert_eq!(u(r, "closed_connections"), 0);
        assert_eq!(u(&r["latency_us"], "samples"), published * 5);
        assert!(u(&r["latency_us"], "p50") > 0);
        assert!(u(&r["latency_us"], "max") >= u(&r["latency_us"], "p99"));
        assert!(r["server_cpu_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["loadgen_core_share"].as_f64().unwrap() > 0.0);
        assert!(
            err.contains("deliveries/s"),
            "human summary missing:\n{err}"
        );
    }
}

#[test]
fn bursts_and_max_steps() {
    let s = Server::start(&["--shards", "2"]);
    let url = s.url("/ws");
    let (lines, _) = ok_bench(&[
        "fanout", "--url", &url, "--secret", SECRET, "-r", "2", "-m", "4", "--burst", "5", "-s",
        "200", "-t", "1",
    ]);
    let r = &lines[0];
    assert_eq!(u(r, "burst"), 5);
    assert_eq!(u(r, "published") % 10, 0, "whole bursts per channel: {r}");
    assert_eq!(u(r, "loss"), 0);

    let (lines, err) = ok_bench(&[
        "max",
        "--url",
        &url,
        "--secret",
        SECRET,
        "-r",
        "1",
        "-m",
        "4",
        "--start-rate",
        "50",
        "--factor",
        "2",
        "--max-rate",
        "200",
        "--step-duration",
        "0.5",
        "--warmup",
        "0.3",
        "--max-steps",
        "3",
        "--p99-bound-ms",
        "1000",
    ]);
    let steps: Vec<&Value> = lines
        .iter()
        .filter(|l| l["workload"] == "max-step")
        .collect();
    assert_eq!(steps.len(), 3, "{lines:?}\n{err}");
    assert_eq!(lines[0]["workload"], "max-warmup", "{lines:?}");
    assert_eq!(lines[0]["rate"].as_f64(), Some(50.0));
    assert!(lines[0].get("pass").is_none(), "the warm-up is not judged");
    let rates: Vec<f64> = steps.iter().map(|s| s["rate"].as_f64().unwrap()).collect();
    assert_eq!(rates, vec![50.0, 100.0, 200.0]);
    assert!(steps.iter().all(|s| s["pass"] == true), "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["workload"], "max");
    assert_eq!(last["sustained_rate"].as_f64(), Some(200.0));
    assert_eq!(last["half_rate"].as_f64(), Some(100.0));
    assert_eq!(u(last, "half_rate_loss"), 0);
}

#[test]
fn echo_and_idle() {
    let s = Server::start(&[]);
    let url = s.url("/ws");
    let pid = s.child.id().to_string();
    for protocol in ["json", "binary"] {
        let (lines, _) = ok_bench(&[
            "echo",
            "--url",
            &url,
            "--secret",
            SECRET,
            "--protocol",
            protocol,
            "-c",
            "4",
            "-t",
            "0.5",
        ]);
        let r = &lines[0];
        assert_eq!(r["workload"], "echo");
        assert!(u(r, "round_trips") > 20, "{r}");
        assert_eq!(u(&r["latency_us"], "samples"), u(r, "round_trips"));
        assert_eq!(u(r, "closed_connections"), 0);
    }
    let (lines, err) = ok_bench(&[
        "idle",
        "--url",
        &url,
        "--secret",
        SECRET,
        "-n",
        "300",
        "--hold",
        "0.5",
        "--source-ips",
        "2",
        "--server-pid",
        &pid,
    ]);
    let r = &lines[0];
    assert_eq!(u(r, "connections"), 300);
    // Each in a room of 100 (the bench fails when a join is not acked).
    assert_eq!(u(r, "room_size"), 100);
    assert_eq!(u(r, "source_ips"), 2);
    assert_eq!(u(r, "closed_connections"), 0);
    // The server's memory was read before and after, and the figure is
    // their difference per connection (it may be 0 when the connections
    // fit in memory the server had already).
    let (before, after) = (u(r, "server_rss_before"), u(r, "server_rss_after"));
    assert!(before > 1_000_000 && after > 1_000_000, "{r}\n{err}");
    let per = r["server_rss_bytes_per_connection"].as_f64().unwrap();
    assert_eq!(per, ((after as f64 - before as f64) / 300.0).round(), "{r}");
    // What opening cost the server, per connection, from its CPU time in
    // /proc (clock ticks: a fast open may read as 0).
    let cpu = r["open_server_cpu_s"].as_f64().unwrap();
    let per_open = r["server_cpu_us_per_open"].as_f64().unwrap();
    assert!(cpu >= 0.0, "{r}");
    assert!((per_open - cpu * 1e6 / 300.0).abs() < 0.01, "{r}");
    let share = r["open_loadgen_core_share"].as_f64().unwrap();
    assert!(share > 0.0 && share <= 1.5, "{r}");
    // A connection from a chosen source address really comes from there.
    let addr = s.addr;
    runtime().block_on(async move {
        let src: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let c = corecast::client::connect_tcp(addr, Some(src))
            .await
            .unwrap();
        assert_eq!(c.local_addr().unwrap().ip(), src);
    });
}

#[test]
fn bad_targets_fail_with_a_reason() {
    let s = Server::start(&[]);
    let url = s.url("/ws");
    let (ok, lines, err) = bench(&[
        "fanout",
        "--url",
        &url,
        "--secret",
        "wrong-secret",
        "-r",
        "1",
        "-m",
        "1",
        "-t",
        "0.2",
    ]);
    assert!(!ok && lines.is_empty());
    assert!(err.contains("401"), "{err}");
    // Nothing listens on port 9 of 127.0.0.1 here.
    let (ok, _, err) = bench(&[
        "echo",
        "--url",
        "ws://127.0.0.1:9/ws",
        "-c",
        "1",
        "-t",
        "0.2",
    ]);
    assert!(!ok);
    assert!(err.contains("refused"), "{err}");
    let (ok, _, err) = bench(&["fanout", "--url", &url, "--rate", "0"]);
    assert!(!ok && err.contains("--rate"), "{err}");
}

/// A loopback address nothing listens on: a port the OS just handed out
/// and that was closed again.
fn closed_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The baseline example, started on a free port.
struct Baseline {
    child: Child,
    addr: SocketAddr,
}

impl Baseline {
    fn start() -> Baseline {
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_corecast"))
            .parent()
            .unwrap()
            .join("examples/baseline");
        assert!(
            exe.exists(),
            "{} is missing: build it first with `cargo build --examples` (scripts/test.sh does)",
            exe.display()
        );
        let mut child = Command::new(exe)
            .arg("127.0.0.1:0")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("baseline listening on ")
            .unwrap_or_else(|| panic!("unexpected: {line}"))
            .parse()
            .unwrap();
        Baseline { child, addr }
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn raw_protocol_against_the_baseline_server() {
    let b = Baseline::start();
    let url = format!("ws://{}/", b.addr);
    let pid = b.child.id().to_string();
    let (lines, err) = ok_bench(&[
        "fanout",
        "--url",
        &url,
        "--protocol",
        "raw",
        "-r",
        "2",
        "-m",
        "5",
        "-s",
        "200",
        "-t",
        "1",
        "--server-pid",
        &pid,
    ]);
    let r = &lines[0];
    assert_eq!(r["protocol"], "raw");
    assert_eq!(u(r, "delivered"), u(r, "published") * 5, "{r}\n{err}");
    assert_eq!(u(r, "loss"), 0);
    let (lines, _) = ok_bench(&[
        "echo",
        "--url",
        &url,
        "--protocol",
        "raw",
        "-c",
        "3",
        "-t",
        "0.5",
    ]);
    assert!(u(&lines[0], "round_trips") > 20);
}

fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
}

#[test]
fn client_sdk_round_trip_in_both_protocols() {
    let s = Server::start(&["--shards", "2"]);
    let url = s.url("/ws");
    runtime().block_on(async move {
        for protocol in [Protocol::Json, Protocol::Binary] {
            let opts = |user: &str| {
                ConnectOptions::new(url.parse().unwrap())
                    .token(crate::common::token(user, 600))
                    .protocol(protocol)
            };
            let mut alice = Client::connect(&opts("alice")).await.unwrap();
            let mut bob = Client::connect(&opts("bob")).await.unwrap();
            assert_eq!(alice.protocol(), protocol);
            assert_eq!(alice.ready().unwrap().user_id, "alice");
            for c in [&mut alice, &mut bob] {
                let ack = c
                    .call(ClientEvent::ChannelJoin(ChannelJoin::new("sdk")))
                    .await
                    .unwrap();
                assert!(matches!(ack.event, ServerEvent::Ack(_)), "{ack:?}");
            }
            alice
                .call(ClientEvent::MessageSend(MessageSend::new("sdk", "héllo")))
                .await
                .unwrap();
            let got = loop {
                if let ServerEvent::MessageNew(m) = bob.next_event().await.unwrap().event {
                    break m;
                }
            };
            assert_eq!(
                (got.user_id.as_str(), got.content.as_str()),
                ("alice", "héllo")
            );
            match bob.call(ClientEvent::Unsupported("dance".into())).await {
                Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Unsupported),
                other => panic!("{other:?}"),
            }
            alice.close(1000, "bye").await.unwrap();
            bob.close(1000, "bye").await.unwrap();
        }
        // Refusals surface as typed errors.
        let bad = ConnectOptions::new(url.parse().unwrap()).token("not-a-token");
        match Client::connect(&bad).await {
            Err(ClientError::Refused { status: 401, .. }) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a bad token was accepted"),
        }
        let mut nowhere =
            ConnectOptions::new(format!("ws://{}/ws", closed_port()).parse().unwrap());
        nowhere.timeout = Duration::from_secs(2);
        assert!(matches!(
            Client::connect(&nowhere).await,
            Err(ClientError::Io(_))
        ));
    });
}
