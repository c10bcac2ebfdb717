//! Calibration: what the kernel charges per small write on loopback TCP on
//! this host, with no WebSocket server involved. A writer thread (core 0)
//! writes 100-byte frames round-robin to N sockets at a fixed rate, K frames
//! per write; a reader thread (core 1) drains the other ends by busy
//! polling, so the writer never pays for waking it. Prints the writer
//! thread's CPU time (user + system) per frame.
//!
//!     cargo run --release --example rawtcp -- [CONNS] [FRAMES_PER_S] [FRAMES_PER_WRITE]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec; CLOCK_THREAD_CPUTIME_ID = 3.
    unsafe { clock_gettime(3, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 / 1e9
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

fn main() {
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .map_or(default, |s| s.parse().unwrap())
    };
    let (conns, rate, per_write) = (arg(1, 1000) as usize, arg(2, 100_000), arg(3, 1) as usize);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut readers = Vec::with_capacity(conns);
    let mut writers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let c = TcpStream::connect(addr).unwrap();
        let (s, _) = listener.accept().unwrap();
        s.set_nodelay(true).unwrap();
        c.set_nonblocking(true).unwrap();
        readers.push(c);
        writers.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_reader = stop.clone();
    let reader = std::thread::spawn(move || {
        monoio::utils::bind_to_cpu_set([1]).unwrap();
        let mut buf = [0u8; 65536];
        let mut got = 0u64;
        while !stop_reader.load(Ordering::Relaxed) {
            for c in readers.iter_mut() {
                if let Ok(n) = c.read(&mut buf) {
                    got += n as u64;
                }
            }
        }
        got
    });
    monoio::utils::bind_to_cpu_set([0]).unwrap();
    let chunk = vec![b'x'; 100 * per_write];
    let total = rate * 4;
    let (t0, cpu0) = (Instant::now(), thread_cpu());
    let (mut sent, mut i) = (0u64, 0usize);
    while sent < total {
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            writers[i % conns].write_all(&chunk).unwrap();
            i += 1;
            sent += per_write as u64;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let cpu = thread_cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    let bytes = reader.join().unwrap();
    println!(
        "conns={conns} frames_per_s={rate} frames_per_write={per_write} writer_cpu_per_frame_us={:.2} bytes_read={bytes}",
        cpu * 1e6 / total as f64
    );
}
