//! `corecast doctor`: what this host lacks for a connection target.
//!
//! [`Readings`] are gathered from `/proc` and the process limits by
//! [`Readings::from_host`]; [`evaluate`] is a pure function of the readings
//! and the target, so its judgement is tested without a host.

use std::fmt::Write as _;

/// What the host says about itself. `None`: could not be read.
#[derive(Debug, Clone, Default)]
pub struct Readings {
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    pub file_max: Option<u64>,
    pub nr_open: Option<u64>,
    pub somaxconn: Option<u64>,
    pub syn_backlog: Option<u64>,
    pub netdev_backlog: Option<u64>,
    /// `tcp_mem` maximum, in pages.
    pub tcp_mem_max_pages: Option<u64>,
    pub local_ports: Option<(u64, u64)>,
    pub mem_available_kib: Option<u64>,
    /// `kernel.io_uring_disabled`: 0 enabled, 1 restricted, 2 disabled;
    /// `None` on kernels without the setting.
    pub io_uring_disabled: Option<u64>,
    pub kernel: Option<(u64, u64)>,
    pub cpus: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: &'static str,
    pub message: String,
}

/// Descriptors beyond one per connection: listeners, rings, logs, mesh.
const FD_HEADROOM: u64 = 1024;
/// Server RSS per idle connection measured on the io_uring loop
/// (docs/BENCHMARKS.md: 446-456 B at 10,000-19,000), rounded up to leave
/// room for channel memberships.
const USER_BYTES_PER_CONN_URING: u64 = 1024;
/// The same on the epoll fallback (a task pair and a read buffer per
/// connection: 5.3-5.5 KB measured), rounded up.
const USER_BYTES_PER_CONN_EPOLL: u64 = 6 * 1024;
/// Kernel memory per idle TCP connection: socket, inode, file and io_uring
/// structures. Measured: slab memory grew by 100 MB for 10,000 idle
/// loopback connections (20,000 sockets, both ends on one host), 5 KB per
/// socket (docs/BENCHMARKS.md). Buffered data comes on top (`tcp_mem`).
const KERNEL_BYTES_PER_CONN: u64 = 5 * 1024;

fn finding(level: Level, what: &'static str, message: String) -> Finding {
    Finding {
        level,
        what,
        message,
    }
}

/// Judges the readings against a target number of connections.
pub fn evaluate(r: &Readings, target: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    let fds = target + FD_HEADROOM;
    match r.nofile_soft {
        Some(n) if n >= fds => out.push(finding(Level::Ok, "nofile", format!("open files limit {n} >= {fds}"))),
        Some(n) => out.push(finding(
            Level::Fail,
            "nofile",
            format!(
                "open files limit is {n}, need {fds}: set LimitNOFILE={fds} (systemd) or `ulimit -n {fds}`{}",
                match r.nofile_hard {
                    Some(h) if h < fds => format!(" (the hard limit {h} must be raised too)"),
                    _ => String::new(),
                }
            ),
        )),
        None => out.push(finding(Level::Warn, "nofile", "cannot read the open files limit".into())),
    }
    for (what, value, sysctl) in [
        ("nr_open", r.nr_open, "fs.nr_open"),
        ("file_max", r.file_max, "fs.file-max"),
    ] {
        match value {
            Some(n) if n >= fds => out.push(finding(Level::Ok, what, format!("{sysctl} = {n}"))),
            Some(n) => out.push(finding(
                Level::Fail,
                what,
                format!("{sysctl} = {n}, need {fds}: sysctl -w {sysctl}={fds}"),
            )),
            None => out.push(finding(Level::Warn, what, format!("cannot read {sysctl}"))),
        }
    }
    let busy = target >= 10_000;
    for (what, value, sysctl, want) in [
        ("somaxconn", r.somaxconn, "net.core.somaxconn", 4096),
        (
            "syn_backlog",
            r.syn_backlog,
            "net.ipv4.tcp_max_syn_backlog",
            4096,
        ),
        (
            "netdev_backlog",
            r.netdev_backlog,
            "net.core.netdev_max_backlog",
            16384,
        ),
    ] {
        match value {
            Some(n) if n >= want || !busy => {
                out.push(finding(Level::Ok, what, format!("{sysctl} = {n}")))
            }
            Some(n) => out.push(finding(
                Level::Warn,
                what,
                format!(
                    "{sysctl} = {n}: reconnect bursts may be dropped; sysctl -w {sysctl}={want}"
                ),
            )),
            None => out.push(finding(Level::Info, what, format!("cannot read {sysctl}"))),
        }
    }
    let kernel_need = target * KERNEL_BYTES_PER_CONN;
    if let Some(pages) = r.tcp_mem_max_pages {
        let have = pages * 4096;
        let level = if have >= kernel_need {
            Level::Ok
        } else {
            Level::Warn
        };
        out.push(finding(
            level,
            "tcp_mem",
            format!(
                "net.ipv4.tcp_mem max = {} MiB; {target} connections need about {} MiB of socket memory",
                have >> 20,
                kernel_need >> 20
            ),
        ));
    }
    if let Some(kib) = r.mem_available_kib {
        let user = if r.io_uring_usable() {
            USER_BYTES_PER_CONN_URING
        } else {
            USER_BYTES_PER_CONN_EPOLL
        };
        let need = target * (user + KERNEL_BYTES_PER_CONN);
        let level = if kib * 1024 >= need {
            Level::Ok
        } else {
            Level::Fail
        };
        out.push(finding(
            level,
            "memory",
            format!(
                "{} MiB available; {target} idle connections need about {} MiB (corecast and kernel)",
                kib >> 10,
                need >> 20
            ),
        ));
    }
    match r.io_uring_disabled {
        Some(2) => out.push(finding(
            Level::Warn,
            "io_uring",
            "kernel.io_uring_disabled = 2: corecast will run on epoll; set it to 0 for io_uring".into(),
        )),
        Some(1) => out.push(finding(
            Level::Warn,
            "io_uring",
            "kernel.io_uring_disabled = 1: only privileged processes (or the io_uring group) get io_uring".into(),
        )),
        _ => match r.kernel {
            Some((major, minor)) if (major, minor) < (6, 0) => out.push(finding(
                Level::Warn,
                "io_uring",
                format!(
                    "kernel {major}.{minor}: the io_uring loop needs Linux 6.0 (multishot receives into provided buffers); corecast will run on epoll"
                ),
            )),
            Some((major, minor)) => out.push(finding(Level::Ok, "io_uring", format!("kernel {major}.{minor} with io_uring enabled"))),
            None => out.push(finding(Level::Info, "io_uring", "cannot read the kernel version".into())),
        },
    }
    if let Some((lo, hi)) = r.local_ports {
        let span = hi.saturating_sub(lo) + 1;
        out.push(finding(
            Level::Info,
            "local_ports",
            format!(
                "{span} local ports ({lo}-{hi}): a load generator needs one source address per {span} connections"
            ),
        ));
    }
    out.push(finding(
        Level::Info,
        "cpus",
        format!("{} cores: one shard each", r.cpus),
    ));
    out
}

fn read_u64s(path: &str) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().map(|w| w.parse().ok()).collect()
}

fn read_u64(path: &str) -> Option<u64> {
    read_u64s(path)?.first().copied()
}

fn rlimit(resource: libc::__rlimit_resource_t) -> (Option<u64>, Option<u64>) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct.
    if unsafe { libc::getrlimit(resource, &mut r) } != 0 {
        return (None, None);
    }
    (Some(r.rlim_cur), Some(r.rlim_max))
}

impl Readings {
    /// Whether corecast will run its io_uring loop on this host (rather
    /// than fall back to epoll).
    pub fn io_uring_usable(&self) -> bool {
        !matches!(self.io_uring_disabled, Some(1) | Some(2))
            && self.kernel.is_none_or(|k| k >= (6, 0))
    }
}

/// The running kernel's (major, minor) version.
pub fn kernel_version() -> Option<(u64, u64)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

impl Readings {
    /// Reads this host.
    pub fn from_host() -> Readings {
        let (nofile_soft, nofile_hard) = rlimit(libc::RLIMIT_NOFILE);
        let mem_available_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        });
        Readings {
            nofile_soft,
            nofile_hard,
            file_max: read_u64("/proc/sys/fs/file-max"),
            nr_open: read_u64("/proc/sys/fs/nr_open"),
            somaxconn: read_u64("/proc/sys/net/core/somaxconn"),
            syn_backlog: read_u64("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
            netdev_backlog: read_u64("/proc/sys/net/core/netdev_max_backlog"),
            tcp_mem_max_pages: read_u64s("/proc/sys/net/ipv4/tcp_mem")
                .and_then(|v| v.get(2).copied()),
            local_ports: read_u64s("/proc/sys/net/ipv4/ip_local_port_range")
                .and_then(|v| Some((*v.first()?, *v.get(1)?))),
            mem_available_kib,
            io_uring_disabled: read_u64("/proc/sys/kernel/io_uring_disabled"),
            kernel: kernel_version(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        }
    }
}

/// Renders the findings, one per line, and whether any failed.
pub fn report(findings: &[Finding], target: u64) -> (String, bool) {
    let mut out = format!("corecast doctor: can this host hold {target} connections?\n");
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        let _ = writeln!(out, "[{tag}] {:<14} {}", f.what, f.message);
    }
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    let _ = writeln!(
        out,
        "{}",
        if failed {
            "not ready: fix the FAIL lines (see tuning/README.md)"
        } else {
            "ready (WARN lines matter under load; see tuning/README.md)"
        }
    );
    (out, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roomy() -> Readings {
        Readings {
            nofile_soft: Some(2_000_000),
            nofile_hard: Some(2_000_000),
            file_max: Some(4_000_000),
            nr_open: Some(4_000_000),
            somaxconn: Some(65535),
            syn_backlog: Some(65535),
            netdev_backlog: Some(65536),
            tcp_mem_max_pages: Some(1_572_864),
            local_ports: Some((1024, 65535)),
            mem_available_kib: Some(32 << 20),
            io_uring_disabled: Some(0),
            kernel: Some((6, 8)),
            cpus: 8,
        }
    }

    fn level(f: &[Finding], what: &str) -> Level {
        f.iter().find(|x| x.what == what).unwrap().level
    }

    #[test]
    fn a_tuned_host_is_ready_for_a_million() {
        let f = evaluate(&roomy(), 1_000_000);
        assert!(f.iter().all(|x| x.level <= Level::Info), "{f:?}");
        assert!(!report(&f, 1_000_000).1);
    }

    #[test]
    fn default_limits_fail_with_the_fix() {
        let r = Readings {
            nofile_soft: Some(1024),
            nofile_hard: Some(4096),
            somaxconn: Some(128),
            ..roomy()
        };
        let f = evaluate(&r, 50_000);
        assert_eq!(level(&f, "nofile"), Level::Fail);
        let msg = &f.iter().find(|x| x.what == "nofile").unwrap().message;
        assert!(
            msg.contains("LimitNOFILE=51024") && msg.contains("hard limit 4096"),
            "{msg}"
        );
        assert_eq!(level(&f, "somaxconn"), Level::Warn);
        let (text, failed) = report(&f, 50_000);
        assert!(failed);
        assert!(text.contains("[FAIL] nofile"));
        // A small target does not care about backlogs.
        assert_eq!(level(&evaluate(&r, 100), "somaxconn"), Level::Ok);
    }

    #[test]
    fn memory_and_io_uring() {
        let r = Readings {
            mem_available_kib: Some(1 << 20),
            io_uring_disabled: Some(2),
            ..roomy()
        };
        let f = evaluate(&r, 1_000_000);
        assert_eq!(level(&f, "memory"), Level::Fail);
        assert_eq!(level(&f, "io_uring"), Level::Warn);
        let old = Readings {
            kernel: Some((5, 15)),
            io_uring_disabled: None,
            ..roomy()
        };
        let f = evaluate(&old, 10);
        assert_eq!(level(&f, "io_uring"), Level::Warn);
        let (text, _) = report(&f, 10);
        assert!(text.contains("needs Linux 6.0"), "{text}");
        let new = Readings {
            kernel: Some((6, 1)),
            io_uring_disabled: Some(0),
            ..roomy()
        };
        assert_eq!(level(&evaluate(&new, 10), "io_uring"), Level::Ok);
    }

    #[test]
    fn memory_need_follows_the_io_driver() {
        // 8 GiB hold a million idle connections on the io_uring loop, not
        // on the epoll fallback.
        let uring = Readings {
            mem_available_kib: Some(8 << 20),
            ..roomy()
        };
        assert!(uring.io_uring_usable());
        assert_eq!(level(&evaluate(&uring, 1_000_000), "memory"), Level::Ok);
        let epoll = Readings {
            kernel: Some((5, 15)),
            ..uring
        };
        assert!(!epoll.io_uring_usable());
        assert_eq!(level(&evaluate(&epoll, 1_000_000), "memory"), Level::Fail);
        let disabled = Readings {
            io_uring_disabled: Some(2),
            ..roomy()
        };
        assert!(!disabled.io_uring_usable());
    }

    #[test]
    fn reads_this_host() {
        let r = Readings::from_host();
        assert!(r.nofile_soft.is_some() && r.cpus >= 1);
        assert!(r.kernel.is_some());
    }
}
