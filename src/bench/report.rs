//! Readings (latency percentiles, CPU time and RSS from /proc) and output.

use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

pub fn percentiles(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        samples: h.len(),
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// A histogram for 1 µs to 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn stat_path(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".into(),
    }
}

/// User plus system CPU seconds of a process (this one when `None`).
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path(pid)).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// CPU seconds of several processes together (None: none given, or one
/// cannot be read).
fn servers_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| cpu_seconds(Some(p))).sum()
}

/// Resident set size of a process in bytes (this one when `None`).
pub fn rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU readings of the server and of this process over a window.
#[derive(Debug, Clone)]
pub struct Procs {
    /// The server's processes (their CPU time is added up).
    server: Vec<u32>,
    at: Instant,
    server_cpu: Option<f64>,
    own_cpu: Option<f64>,
}

/// What [`Procs::finish`] measured.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    /// Server CPU seconds over the window (None without --server-pid).
    pub server_cpu_s: Option<f64>,
    /// Server CPU as a share of one core.
    pub server_core_share: Option<f64>,
    /// This load generator's CPU as a share of one core.
    pub loadgen_core_share: f64,
}

impl Procs {
    pub fn start(server: &[u32]) -> Procs {
        Procs {
            server: server.to_vec(),
            at: Instant::now(),
            server_cpu: servers_cpu(server),
            own_cpu: cpu_seconds(None),
        }
    }

    pub fn finish(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let server_cpu_s = match (self.server_cpu, servers_cpu(&self.server)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let own = match (self.own_cpu, cpu_seconds(None)) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        };
        CpuUse {
            server_cpu_s,
            server_core_share: server_cpu_s.map(|s| s / wall),
            loadgen_core_share: own / wall,
        }
    }
}

/// A load generator above this share of its core may be what limits a
/// figure; such figures are marked.
pub const LOADGEN_BOUND_SHARE: f64 = 0.9;

/// "1.23M", "45.6k", "789".
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// "850 µs", "12.3 ms".
pub fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

/// Writes a progress line to stderr: in place on a terminal, one per
/// second otherwise.
pub fn progress(line: &str) {
    use std::io::{IsTerminal, Write};
    let mut e = std::io::stderr();
    if e.is_terminal() {
        let _ = write!(e, "\r\x1b[2K{line}");
    } else {
        let _ = writeln!(e, "{line}");
    }
    let _ = e.flush();
}

/// Ends a sequence of progress lines.
pub fn progress_done() {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = percentiles(&h);
        assert_eq!(l.samples, 1000);
        assert_eq!(l.p50, 500);
        assert_eq!(l.p90, 900);
        assert_eq!(l.p99, 990);
        assert_eq!(l.p999, 999);
        assert_eq!(l.max, 1000);
        assert_eq!(percentiles(&histogram()), Latency::default());
    }

    #[test]
    fn proc_readings_of_this_process() {
        let rss = rss_bytes(None).unwrap();
        assert!(rss > 1 << 20, "{rss}");
        let p = Procs::start(&[std::process::id()]);
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed().as_millis() < 60 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let u = p.finish();
        assert!(x > 0);
        assert!(u.server_cpu_s.unwrap() >= 0.0);
        assert!(u.loadgen_core_share >= 0.0 && u.loadgen_core_share < 4.0);
        assert_eq!(rss_bytes(Some(u32::MAX)), None);
        assert_eq!(cpu_seconds(Some(u32::MAX)), None);
    }

    #[test]
    fn human_numbers() {
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(45_600.0), "45.6k");
        assert_eq!(si(789.0), "789");
        assert_eq!(us(850), "850 µs");
        assert_eq!(us(12_345), "12.3 ms");
    }
}
