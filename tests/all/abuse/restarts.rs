//! A clean exit (SIGTERM, exit 0) leaves the port free: a supervisor that
//! restarts at once sees the new process start, on either IO driver.

use std::time::Duration;

use crate::common::*;

fn restart_at_once(driver: &str) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let api_listen = format!("127.0.0.1:{}", free_port());
    let args = [
        "serve",
        "--listen",
        &listen,
        "--auth-secret",
        SECRET,
        "--shards",
        "2",
        "--io-driver",
        driver,
        "--api-listen",
        &api_listen,
        "--api-key",
        "restart-test-key-0123456789",
    ];
    for round in 0..5 {
        // Start (the harness fails the test if it does not), hold a client,
        // stop, and, the moment the process is gone, take the port as a
        // supervisor's restart would.
        let mut s = Server::start_raw(&args, &[]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let (_ws, ready) = ws_user(&s, "alice").await;
            assert_eq!(ready["t"], "ready");
        });
        s.sigterm();
        assert_eq!(
            s.wait_exit_now(Duration::from_secs(20)),
            Some(0),
            "{driver}: {}",
            s.log()
        );
        for addr in [&listen, &api_listen] {
            let probe =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            probe.set_reuse_address(true).unwrap();
            let at: std::net::SocketAddr = addr.parse().unwrap();
            let bound = probe.bind(&at.into()).and_then(|_| probe.listen(1));
            assert!(
                bound.is_ok(),
                "{driver}, round {round}: {addr} still taken: {bound:?}"
            );
        }
    }
}

#[test]
fn a_stopped_node_can_restart_on_its_port_at_once_io_uring() {
    restart_at_once("io_uring");
}

#[test]
fn a_stopped_node_can_restart_on_its_port_at_once_epoll() {
    restart_at_once("epoll");
}
