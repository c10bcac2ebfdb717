//! Redis for the cluster tests: a redis-server of the test's own on a free
//! port (or a Redis Cluster of them), and corecast nodes that share it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Server;

/// A redis-server of the test's own: no persistence, 127.0.0.1 only, its
/// files (a replica's copy) in a directory of its own, removed with it.
pub struct Redis {
    pub child: Child,
    pub port: u16,
    dir: Option<std::path::PathBuf>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let dir = (!extra.contains(&"--dir")).then(|| {
            let d = std::env::temp_dir().join(format!("corecast-redis-{port}-{:x}", rand_u64()));
            std::fs::create_dir_all(&d).unwrap();
            d
        });
        let dir_args = dir
            .iter()
            .flat_map(|d| ["--dir".to_string(), d.display().to_string()]);
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(dir_args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is missing: scripts/test.sh installs it (apt-get install redis-server)");
        let r = Redis { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if r.ping() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn node(redis: &Redis) -> Server {
    Server::start(&["--shards", "2", "--redis", &redis.url()])
}

/// A redis-server and two nodes that reach it.
pub fn two_nodes() -> (Redis, Server, Server) {
    two_nodes_with(node)
}

/// A redis-server and two nodes that `start` starts on it, once both reach
/// it.
pub fn two_nodes_with(start: impl Fn(&Redis) -> Server) -> (Redis, Server, Server) {
    let redis = Redis::start();
    let (a, b) = (start(&redis), start(&redis));
    wait_cluster(&a, 1);
    wait_cluster(&b, 1);
    (redis, a, b)
}

/// Waits until the node's bridge says whether it reaches Redis.
pub fn wait_cluster(s: &Server, up: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if s.metric("corecast_cluster_up") == up {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("corecast_cluster_up never became {up}:\n{}", s.log());
}

pub fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is missing: scripts/test.sh installs it (apt-get install redis-server)");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A three-master Redis Cluster of the test's own (redis-server with
/// `--cluster-enabled`, joined by `redis-cli --cluster create`), its files
/// in a temporary directory.
pub struct RedisCluster {
    pub masters: Vec<Redis>,
    pub dir: std::path::PathBuf,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(0, &[])
    }

    /// Three masters with `replicas` replicas each (the first three of
    /// `masters` are the masters then), every server started with `extra`.
    pub fn start_with(replicas: usize, extra: &[&str]) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "corecast-redis-cluster-{}-{:x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut masters = Vec::new();
        while masters.len() < 3 * (1 + replicas) {
            // The cluster bus listens on the port + 10000.
            let port = free_port();
            if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            let conf = dir.join(format!("nodes-{port}.conf"));
            let dump = format!("dump-{port}.rdb");
            masters.push(Redis::start_with(
                port,
                &[
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        conf.to_str().unwrap(),
                        "--dir",
                        dir.to_str().unwrap(),
                        "--dbfilename",
                        &dump,
                        // A replica is in sync at once (a replica that
                        // never synced cannot take over).
                        "--repl-diskless-sync-delay",
                        "0",
                    ][..],
                    extra,
                ]
                .concat(),
            ));
        }
        let addrs: Vec<String> = masters
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect(
                "redis-cli is missing: scripts/test.sh installs it (apt-get install redis-server)",
            );
        assert!(out.status.success(), "redis-cli --cluster create: {out:?}");
        let c = RedisCluster { masters, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c
            .masters
            .iter()
            .all(|m| redis_cli(m, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster never became ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for r in &c.masters {
            loop {
                let info = redis_cli(r, &["INFO", "replication"]);
                if info.contains("role:master") || info.contains("master_link_status:up") {
                    break;
                }
                assert!(Instant::now() < deadline, "a replica never synced:\n{info}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        c
    }

    pub fn urls(&self) -> String {
        self.masters
            .iter()
            .map(|m| m.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server that is master of `key`'s slot now.
    pub fn master_of(&self, key: &str) -> &Redis {
        self.try_master_of(key)
            .unwrap_or_else(|| panic!("no master serves the slot of {key}"))
    }

    /// The same; `None` while no live master serves it (a failover).
    pub fn try_master_of(&self, key: &str) -> Option<&Redis> {
        let any = self
            .masters
            .iter()
            .find(|m| m.ping())
            .expect("a live server");
        let slot: u64 = redis_cli(any, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap();
        let nodes = redis_cli(any, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port: u16 = f[1].split(['@', ':']).nth(1).unwrap().parse().unwrap();
            for range in &f[8..] {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                    if (a..=b).contains(&slot) {
                        return self.masters.iter().find(|m| m.port == port);
                    }
                }
            }
        }
        None
    }

    /// Subscribers of a sharded pub/sub channel, over the masters (only the
    /// one serving the channel's slot has any).
    pub fn shard_subscribers(&self, channel: &str) -> Vec<u64> {
        self.masters
            .iter()
            .map(|m| {
                let out = redis_cli(m, &["PUBSUB", "SHARDNUMSUB", channel]);
                out.lines().nth(1).unwrap_or("0").trim().parse().unwrap()
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for m in &mut self.masters {
            m.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(1);
    h.finish()
}
