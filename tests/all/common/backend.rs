//! The example backend (`examples/backend/backend.py`), a real process
//! the tests start: it takes the event stream and answers the hooks.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Server;

pub const HOOK_SECRET: &str = "webhook-secret-0123456789";

/// A fresh directory for one test's backend database and node files:
/// `cc-<suite>-<name>-<pid>` under the system's temporary directory.
pub fn tempdir(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cc-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The example backend, started on `port` (0: a free one).
pub struct Backend {
    child: Child,
    pub addr: SocketAddr,
}

impl Backend {
    pub fn start(db: &Path, port: u16) -> Backend {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend/backend.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--port", &port.to_string(), "--db", db.to_str().unwrap()])
            .args(["--secret", HOOK_SECRET])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the example backend");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("the backend did not start: {line:?}"));
        Backend { child, addr }
    }

    pub fn get(&self, path: &str) -> Value {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1;
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.get("/stats")[name].as_u64().unwrap_or(0)
    }

    /// Waits until the backend has stored `n` distinct events.
    pub fn wait_stored(&self, n: u64, node: &Server) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.stat("stored") < n {
            assert!(
                Instant::now() < deadline,
                "the backend stored {} of {n} events; node:\n{}",
                self.stat("stored"),
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
