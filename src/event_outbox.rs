//! The outbox of the event stream: sequenced channel events wait on disk
//! until the application backend took them, so that nothing accepted is
//! lost while the backend is down or the node restarts.
//!
//! Events are JSON lines (the history file's, [`crate::engine::history::line`])
//! appended by the store's thread to segment files named after the
//! position (in bytes, since the outbox began) of their first line:
//! `00000000000000000000.jsonl`, then a new one every 8 MiB. The webhook
//! thread reads from its cursor (the position of the first event the
//! backend has not taken, kept in `cursor`), and deletes a segment once
//! the cursor is past it. Lines are synced once a second with the
//! history; the cursor is written after each delivery, so a kill delivers
//! a few events again at worst (the backend de-duplicates by channel,
//! epoch and offset).
//!
//! The outbox is bounded: once what waits reaches `outbox_max_bytes`, the
//! [`Backlog`] gate is shut and the engine refuses new messages with
//! `unavailable` until deliveries make room. What was accepted before
//! the gate shut is still written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

use crate::metrics::Counter;

pub use crate::engine::event_stream::Backlog;

/// A new segment starts past this many bytes.
const SEGMENT_BYTES: u64 = 8 << 20;

/// What the store's thread (the writer) and the webhook thread (the
/// reader) share.
pub struct OutboxState {
    /// Where the last line written ends.
    pub written: AtomicU64,
    /// Where the first event the backend has not taken starts.
    pub delivered: AtomicU64,
    /// Bytes waiting at most before the gate shuts.
    pub max_bytes: u64,
    /// The engine's gate.
    pub backlog: Arc<Backlog>,
    /// The reader, woken when lines come.
    pub reader: OnceLock<Thread>,
}

impl OutboxState {
    /// Bytes written and not yet delivered.
    pub fn waiting(&self) -> u64 {
        self.written
            .load(Relaxed)
            .saturating_sub(self.delivered.load(Relaxed))
    }

    /// Shuts or opens the gate after either end moved.
    fn gate(&self) {
        self.backlog.set_full(self.waiting() >= self.max_bytes);
    }
}

/// The event stream's figures, and the outbox they describe.
#[derive(Default)]
pub struct WebhookMetrics {
    /// Events the backend took.
    pub delivered: Counter,
    /// POSTs the backend took.
    pub batches: Counter,
    /// POSTs that failed (no answer, or not a 2xx).
    pub failures: Counter,
    /// Time the taken POSTs took, in microseconds.
    pub request_us: Counter,
    /// Age of the oldest event of the last batch taken, in ms (gauge).
    pub lag_ms: Counter,
    /// In a cluster: 1 while this node is the one that delivers (gauge).
    pub leader: Counter,
}

/// What the node shares of the event stream.
pub struct EventStream {
    pub outbox: Arc<OutboxState>,
    pub metrics: WebhookMetrics,
}

/// Appends the event stream's figures to the metrics text.
pub fn render(out: &mut String, s: &EventStream) {
    let m = &s.metrics;
    series(
        out,
        "webhook_waiting_bytes",
        "gauge",
        "Bytes of events in the outbox the backend has not taken.",
        s.outbox.waiting(),
    );
    series(
        out,
        "webhook_outbox_full",
        "gauge",
        "1 while the outbox is full and new messages are refused.",
        s.outbox.backlog.full() as u8,
    );
    series(
        out,
        "webhook_refused_total",
        "counter",
        "Channel events refused (unavailable) because the outbox was full.",
        s.outbox.backlog.refused(),
    );
    series(
        out,
        "webhook_skipped_total",
        "counter",
        "Optional events (events_include) skipped because the outbox was full.",
        s.outbox.backlog.skipped(),
    );
    deliveries(out, m);
    series(
        out,
        "webhook_request_seconds_total",
        "counter",
        "Time the taken POSTs took, in seconds (divide by requests for the mean).",
        format_args!("{:.6}", m.request_us.get() as f64 / 1e6),
    );
    series(
        out,
        "webhook_lag_seconds",
        "gauge",
        "Age of the oldest event of the last batch taken, in seconds.",
        format_args!("{:.3}", m.lag_ms.get() as f64 / 1e3),
    );
}

/// Appends a cluster node's webhook figures to the metrics text.
pub fn render_relay(out: &mut String, m: &WebhookMetrics) {
    series(
        out,
        "webhook_leader",
        "gauge",
        "1 while this node delivers the events stream to the backend (one node at a time).",
        m.leader.get(),
    );
    deliveries(out, m);
}

/// What the backend took, and the POSTs that failed.
fn deliveries(out: &mut String, m: &WebhookMetrics) {
    series(
        out,
        "webhook_delivered_total",
        "counter",
        "Events the backend took.",
        m.delivered.get(),
    );
    series(
        out,
        "webhook_requests_total",
        "counter",
        "POSTs the backend took (batches).",
        m.batches.get(),
    );
    series(
        out,
        "webhook_failures_total",
        "counter",
        "POSTs that failed (no answer or not a 2xx); each is tried again.",
        m.failures.get(),
    );
}

/// One series in the Prometheus text format.
fn series(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "# HELP corecast_{name} {help}");
    let _ = writeln!(out, "# TYPE corecast_{name} {kind}");
    let _ = writeln!(out, "corecast_{name} {value}");
}

fn segment_name(start: u64) -> String {
    format!("{start:020}.jsonl")
}

/// The segments in `dir`, by their first position.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut starts: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            let name = name.to_str()?;
            let digits = name.strip_suffix(".jsonl")?;
            (digits.len() == 20).then(|| digits.parse().ok())?
        })
        .collect();
    starts.sort_unstable();
    Ok(starts)
}

/// The writing end, owned by the store's thread.
pub struct Outbox {
    dir: PathBuf,
    file: File,
    /// The current segment's first position.
    start: u64,
    written: u64,
    unsynced: bool,
    state: Arc<OutboxState>,
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`: a line cut short by a kill
    /// is dropped, and the cursor is read back.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Outbox, Reader), String> {
        let what = |e: std::io::Error| format!("outbox {}: {e}", dir.display());
        std::fs::create_dir_all(dir).map_err(what)?;
        let starts = segments(dir).map_err(what)?;
        let (start, written) = match starts.last() {
            Some(&start) => {
                let path = dir.join(segment_name(start));
                let text = std::fs::read(&path).map_err(what)?;
                let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if whole < text.len() {
                    tracing::warn!(file = %path.display(), bytes = text.len() - whole,
                        "outbox: dropped a line cut short");
                    let f = OpenOptions::new().write(true).open(&path).map_err(what)?;
                    f.set_len(whole as u64).map_err(what)?;
                }
                (start, start + whole as u64)
            }
            None => (read_cursor(dir).unwrap_or(0), read_cursor(dir).unwrap_or(0)),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(segment_name(start)))
            .map_err(what)?;
        let first = starts.first().copied().unwrap_or(start);
        let cursor = read_cursor(dir).unwrap_or(first).clamp(first, written);
        let state = Arc::new(OutboxState {
            written: AtomicU64::new(written),
            delivered: AtomicU64::new(cursor),
            max_bytes,
            backlog: Arc::new(Backlog::default()),
            reader: OnceLock::new(),
        });
        state.gate();
        let outbox = Outbox {
            dir: dir.to_path_buf(),
            file,
            start,
            written,
            unsynced: false,
            state: state.clone(),
        };
        let cursor_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("cursor"))
            .map_err(what)?;
        let reader = Reader {
            dir: dir.to_path_buf(),
            state,
            at: cursor,
            segment: None,
            buf: Vec::new(),
            cursor: cursor_file,
            oldest: first,
        };
        Ok((outbox, reader))
    }

    pub fn state(&self) -> &Arc<OutboxState> {
        &self.state
    }

    /// Appends whole lines with one write, and wakes the reader.
    pub fn append(&mut self, lines: &[u8]) -> Result<(), String> {
        if lines.is_empty() {
            return Ok(());
        }
        let what = |e: std::io::Error| format!("outbox {}: {e}", self.dir.display());
        if self.written - self.start >= SEGMENT_BYTES {
            self.file.sync_data().map_err(what)?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(segment_name(self.written)))
                .map_err(what)?;
            self.start = self.written;
        }
        self.file.write_all(lines).map_err(what)?;
        self.written += lines.len() as u64;
        self.unsynced = true;
        self.state.written.store(self.written, Relaxed);
        self.state.gate();
        if let Some(t) = self.state.reader.get() {
            t.unpark();
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.unsynced) {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| format!("outbox {}: {e}", self.dir.display()))
    }
}

/// The segment holding position `at` (`segment`: the one open).
fn segment_at<'a>(
    dir: &Path,
    segment: &'a mut Option<(u64, File)>,
    at: u64,
) -> std::io::Result<(u64, &'a File)> {
    let current = match segment {
        Some((start, f)) => {
            let len = f.metadata()?.len();
            at >= *start && at < *start + len
        }
        None => false,
    };
    if !current {
        let starts = segments(dir)?;
        let start = starts
            .iter()
            .rev()
            .find(|&&s| s <= at)
            .copied()
            .ok_or_else(|| std::io::Error::other(format!("no segment holds {at}")))?;
        let f = File::open(dir.join(segment_name(start)))?;
        *segment = Some((start, f));
    }
    let (start, f) = segment.as_ref().expect("set above");
    Ok((*start, f))
}

fn read_cursor(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join("cursor"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The reading end, owned by the webhook thread.
pub struct Reader {
    dir: PathBuf,
    state: Arc<OutboxState>,
    /// The first position not delivered.
    at: u64,
    /// The segment being read: its first position and file.
    segment: Option<(u64, File)>,
    /// What is read, kept from batch to batch (so that its memory is not
    /// asked for, and zeroed by the kernel, each time).
    buf: Vec<u8>,
    /// The `cursor` file.
    cursor: File,
    /// The first segment on disk.
    oldest: u64,
}

/// Events read for one delivery.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    /// Whole lines, each ending in a newline.
    pub lines: &'a [u8],
    pub events: usize,
    /// Where the next batch starts.
    pub end: u64,
}

impl Reader {
    pub fn state(&self) -> &Arc<OutboxState> {
        &self.state
    }

    /// Up to `max_events` events (and about `max_bytes`, more when one
    /// event is larger) from the cursor on; none when all was delivered.
    pub fn read(&mut self, max_events: usize, max_bytes: usize) -> Result<Batch<'_>, String> {
        let what = |e: std::io::Error| format!("outbox {}: {e}", self.dir.display());
        let written = self.state.written.load(Relaxed);
        let at = self.at;
        if at >= written {
            return Ok(Batch {
                end: at,
                ..Batch::default()
            });
        }
        let (start, file) = segment_at(&self.dir, &mut self.segment, at).map_err(what)?;
        let in_file = at - start;
        let len = file.metadata().map_err(what)?.len();
        let available = (len.min(written - start)).saturating_sub(in_file) as usize;
        let mut want = available.min(max_bytes.max(64 << 10));
        loop {
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
            let read = &mut self.buf[..want];
            file.read_exact_at(read, in_file).map_err(what)?;
            let mut end = 0;
            let mut events = 0;
            for (n, i) in memchr::memchr_iter(b'\n', read).enumerate() {
                if n == max_events || (end > 0 && i + 1 > max_bytes) {
                    break;
                }
                end = i + 1;
                events = n + 1;
            }
            if end > 0 {
                return Ok(Batch {
                    lines: &self.buf[..end],
                    events,
                    end: at + end as u64,
                });
            }
            if want == available {
                // The segment ends inside a line: not one written here.
                return Err(format!(
                    "outbox {}: a line without its end at {at}",
                    self.dir.display()
                ));
            }
            want = (want * 2).min(available);
        }
    }

    /// The backend took everything before `end`: the cursor moves there,
    /// and segments wholly before it go.
    pub fn delivered(&mut self, end: u64) -> Result<(), String> {
        let what = |e: std::io::Error| format!("outbox {}: {e}", self.dir.display());
        self.at = end;
        // One write in place, of a fixed width.
        let mut text = [b'\n'; 21];
        let digits = format!("{end:020}");
        text[..20].copy_from_slice(&digits.as_bytes()[..20]);
        self.cursor.write_all_at(&text, 0).map_err(what)?;
        self.state.delivered.store(end, Relaxed);
        self.state.gate();
        // Once reading has moved to a later segment, the earlier ones are
        // done (a segment is read only once what came before it was
        // taken).
        let reading = self.segment.as_ref().map_or(0, |(s, _)| *s);
        if reading > self.oldest && end >= reading {
            for start in segments(&self.dir).map_err(what)? {
                if start < reading {
                    std::fs::remove_file(self.dir.join(segment_name(start))).map_err(what)?;
                }
            }
            self.oldest = reading;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cc-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn line(i: usize, pad: usize) -> Vec<u8> {
        format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(pad)).into_bytes()
    }

    fn ids(b: &Batch) -> Vec<usize> {
        b.lines
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice::<serde_json::Value>(l).unwrap()["i"]
                    .as_u64()
                    .unwrap() as usize
            })
            .collect()
    }

    #[test]
    fn events_come_out_in_order_across_segments_and_restarts() {
        let dir = tempdir("order");
        let (mut w, mut r) = Outbox::open(&dir, 1 << 30).unwrap();
        assert_eq!(r.read(10, 1 << 20).unwrap().events, 0);
        // 3 segments' worth, in batches of 100 lines of ~10 KiB.
        let mut n = 0;
        while segments(&dir).unwrap().len() < 3 {
            let mut lines = Vec::new();
            for _ in 0..100 {
                lines.extend(line(n, 10_000));
                n += 1;
            }
            w.append(&lines).unwrap();
        }
        assert!(w.written > 2 * SEGMENT_BYTES);
        let mut seen = Vec::new();
        // Half, then a restart: the cursor holds.
        while seen.len() < n / 2 {
            let b = r.read(70, 256 << 10).unwrap();
            assert!(b.events > 0 && b.events <= 70);
            seen.extend(ids(&b));
            let end = b.end;
            r.delivered(end).unwrap();
        }
        // A kill cuts a write short.
        w.file.write_all(b"{\"i\":").unwrap();
        drop((w, r));
        let (mut w, mut r) = Outbox::open(&dir, 1 << 30).unwrap();
        w.append(&line(n, 10)).unwrap();
        n += 1;
        loop {
            let b = r.read(1000, 1 << 20).unwrap();
            if b.events == 0 {
                break;
            }
            seen.extend(ids(&b));
            let end = b.end;
            r.delivered(end).unwrap();
        }
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        // Only the segment being written is left.
        assert_eq!(segments(&dir).unwrap().len(), 1);
        assert_eq!(r.state().waiting(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_gate_shuts_when_full_and_opens_as_events_go() {
        let dir = tempdir("gate");
        let (mut w, mut r) = Outbox::open(&dir, 1000).unwrap();
        let one = line(0, 80);
        let mut appended = 0;
        while !r.state().backlog.full() {
            w.append(&one).unwrap();
            appended += 1;
        }
        assert_eq!(appended, 1000usize.div_ceil(one.len()));
        assert!(r.state().waiting() >= 1000);
        let b = r.read(1, 1 << 20).unwrap();
        assert_eq!(b.events, 1);
        let end = b.end;
        r.delivered(end).unwrap();
        assert!(!r.state().backlog.full());
        // Reopened full: still full.
        w.append(&one).unwrap();
        drop((w, r));
        let (_w, r) = Outbox::open(&dir, 1000).unwrap();
        assert!(r.state().backlog.full());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_line_larger_than_a_read_is_read_whole() {
        let dir = tempdir("large");
        let (mut w, mut r) = Outbox::open(&dir, 1 << 30).unwrap();
        w.append(&line(7, 300_000)).unwrap();
        w.append(&line(8, 10)).unwrap();
        let b = r.read(10, 1000).unwrap();
        assert_eq!(ids(&b), vec![7]);
        let end = b.end;
        r.delivered(end).unwrap();
        let b = r.read(10, 1000).unwrap();
        assert_eq!(ids(&b), vec![8]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
