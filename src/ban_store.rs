//! The ban store of a single node: one JSON line per ban or unban,
//! appended and synced before the ban takes effect, compacted (expired and
//! lifted bans dropped) each time the node starts.
//!
//! The file is written on a thread of its own, an endpoint of the mesh
//! ([`spawn`]): a shard asks it to store a ban (`MeshMsg::StoreBan`) and
//! applies the ban when it answers (`MeshMsg::BanStored`), so no shard
//! waits for a disk. Bans asked for together are written together and
//! synced once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::{MeshMsg, ModKind, Moderation, ShardId};
use crate::history_store::HistoryStore;
use crate::node::Node;

/// One line of the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Line {
    op: Op,
    user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel_id: Option<String>,
    /// When a ban ends (milliseconds); absent: until lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    by: String,
    at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Ban,
    Unban,
    /// Only between cluster nodes, never in the file.
    Kick,
}

impl Line {
    fn of(m: &Moderation) -> Option<Line> {
        let (op, until) = match m.kind {
            ModKind::Ban { until } => (Op::Ban, until),
            ModKind::Unban => (Op::Unban, None),
            ModKind::Kick => (Op::Kick, None),
        };
        Some(Line {
            op,
            user_id: m.user.to_string(),
            channel_id: m.channel.as_ref().map(|c| c.to_string()),
            until,
            reason: m.reason.clone(),
            by: m.by.clone(),
            at: m.at,
        })
    }

    fn moderation(&self) -> Moderation {
        Moderation {
            kind: match self.op {
                Op::Ban => ModKind::Ban { until: self.until },
                Op::Unban => ModKind::Unban,
                Op::Kick => ModKind::Kick,
            },
            user: self.user_id.as_str().into(),
            channel: self.channel_id.as_deref().map(Into::into),
            reason: self.reason.clone(),
            by: self.by.clone(),
            at: self.at,
            from: None,
            ack: None,
        }
    }
}

/// A moderation action as one JSON object: a line of the ban file, and what
/// cluster nodes publish to each other (kicks included) and keep in Redis.
pub fn to_json(m: &Moderation) -> String {
    let line = Line::of(m).expect("every action has a line");
    serde_json::to_string(&line).expect("plain data serializes")
}

/// The action of [`to_json`]'s text.
pub fn from_json(text: &str) -> Result<Moderation, String> {
    serde_json::from_str::<Line>(text)
        .map(|l| l.moderation())
        .map_err(|e| format!("not a moderation action: {e}"))
}

pub struct BanStore {
    path: PathBuf,
    file: File,
}

impl BanStore {
    /// Opens (or creates) the store, compacts it, and returns the bans in
    /// force at `now`.
    pub fn open(path: &Path, now: u64) -> Result<(BanStore, Vec<Moderation>), String> {
        let what = |e: std::io::Error| format!("ban file {}: {e}", path.display());
        let mut live: HashMap<(String, Option<String>), Line> = HashMap::new();
        match File::open(path) {
            Ok(f) => {
                let mut lines = BufReader::new(f).lines().enumerate().peekable();
                while let Some((n, line)) = lines.next() {
                    let line = line.map_err(what)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let parsed: Line = match serde_json::from_str(&line) {
                        Ok(l) => l,
                        // A last line cut short by a crash never took effect.
                        Err(_) if lines.peek().is_none() => {
                            tracing::warn!(file = %path.display(), line = n + 1, "ignoring an incomplete last line");
                            break;
                        }
                        Err(e) => {
                            return Err(format!("ban file {} line {}: {e}", path.display(), n + 1))
                        }
                    };
                    let key = (parsed.user_id.clone(), parsed.channel_id.clone());
                    match parsed.op {
                        Op::Ban => live.insert(key, parsed),
                        Op::Unban => live.remove(&key),
                        Op::Kick => None,
                    };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(what(e)),
        }
        let mut bans: Vec<Line> = live
            .into_values()
            .filter(|l| l.until.is_none_or(|u| u > now))
            .collect();
        bans.sort_by_key(|l| l.at);
        // Rewrite it compacted, then append from there.
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(what)?;
            for l in &bans {
                let mut text = serde_json::to_vec(l).expect("plain data serializes");
                text.push(b'\n');
                f.write_all(&text).map_err(what)?;
            }
            f.sync_all().map_err(what)?;
        }
        std::fs::rename(&tmp, path).map_err(what)?;
        let file = OpenOptions::new().append(true).open(path).map_err(what)?;
        let store = BanStore {
            path: path.to_path_buf(),
            file,
        };
        Ok((store, bans.iter().map(Line::moderation).collect()))
    }

    /// Appends a ban or unban and waits until it is on disk.
    pub fn append(&mut self, m: &Moderation) -> Result<(), String> {
        self.append_all([m])
    }

    /// Appends bans and unbans (kicks leave no line) in one write and
    /// waits until they are on disk: one sync for all of them. On an error
    /// none of them may take effect (some may be on disk all the same, and
    /// take effect at the next start).
    pub fn append_all<'a>(
        &mut self,
        all: impl IntoIterator<Item = &'a Moderation>,
    ) -> Result<(), String> {
        let mut text = Vec::new();
        for line in all
            .into_iter()
            .filter_map(Line::of)
            .filter(|l| l.op != Op::Kick)
        {
            serde_json::to_writer(&mut text, &line).expect("plain data serializes");
            text.push(b'\n');
        }
        if text.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&text)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| format!("ban file {}: {e}", self.path.display()))
    }
}

/// A line's buffer, back to the pool of the shard that sent it.
#[allow(clippy::box_collection)] // as the mesh carries it
fn give_back(node: &Node, shard: ShardId, line: Box<Vec<u8>>) {
    if let Some(pool) = node.line_pools.get(shard as usize) {
        pool.give(line);
    }
}

/// How often the store's thread looks for events while they come.
const POLL: Duration = Duration::from_millis(10);

/// What the store's thread writes: the ban file, the history file, the
/// event stream's outbox (any of them).
pub struct Stores {
    pub bans: Option<BanStore>,
    pub history: Option<HistoryStore>,
    pub outbox: Option<crate::event_outbox::Outbox>,
}

/// Starts the store's thread, the mesh endpoint
/// [`crate::mesh::store_endpoint`]; `bell` is the receiving end of its
/// doorbell. The thread ends when the node drains.
pub fn spawn(
    node: Arc<Node>,
    stores: Stores,
    bell: UnixStream,
) -> std::io::Result<JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new()
        .name("corecast-store".into())
        .spawn(move || run(&node, stores, bell))
}

fn run(node: &Node, stores: Stores, mut bell: UnixStream) -> std::io::Result<()> {
    let Stores {
        mut bans,
        mut history,
        mut outbox,
    } = stores;
    bell.set_nonblocking(false)?;
    // A backstop: the doorbell rings on drain too; and the history is
    // synced at least this often.
    bell.set_read_timeout(Some(Duration::from_millis(500)))?;
    let shards = node.mesh.shards();
    let me = crate::mesh::store_endpoint(shards);
    let mut batch: Vec<(ShardId, Box<Moderation>)> = Vec::new();
    // The history file's lines, and the outbox's (the same, with the
    // optional events in their places among them).
    let mut lines: Vec<u8> = Vec::new();
    let mut events: Vec<u8> = Vec::new();
    let mut synced = std::time::Instant::now();
    // When history last came (long ago: the thread parks).
    let mut busy = synced - Duration::from_secs(1);
    loop {
        for from in 0..shards as ShardId {
            while let Some(msg) = node.mesh.pop(from, me) {
                match msg {
                    MeshMsg::StoreBan { from, moderation } => batch.push((from, moderation)),
                    MeshMsg::KeepHistory(line) => {
                        if history.is_some() {
                            lines.extend_from_slice(&line);
                        }
                        if outbox.is_some() {
                            events.extend_from_slice(&line);
                        }
                        give_back(node, from, line);
                    }
                    MeshMsg::KeepEvent(line) => {
                        if outbox.is_some() {
                            events.extend_from_slice(&line);
                        }
                        give_back(node, from, line);
                    }
                    other => tracing::debug!(?other, "the store ignores a message"),
                }
            }
        }
        // What came together is written with one write.
        if !lines.is_empty() {
            busy = std::time::Instant::now();
            if let Some(Err(e)) = history
                .as_mut()
                .map(|h| h.append(&lines, crate::clock::now_ms()))
            {
                tracing::error!(error = %e, "cannot keep the history");
            }
            lines.clear();
        }
        if !events.is_empty() {
            busy = std::time::Instant::now();
            if let Some(o) = outbox.as_mut() {
                if let Err(e) = o.append(&events) {
                    // New events are refused until a write goes through.
                    o.state().backlog.set_full(true);
                    tracing::error!(error = %e, "cannot keep events for the backend");
                }
            }
            events.clear();
        }
        if synced.elapsed() >= Duration::from_secs(1) || node.is_draining() {
            synced = std::time::Instant::now();
            if let Some(Err(e)) = history.as_mut().map(HistoryStore::sync) {
                tracing::error!(error = %e, "cannot sync the history");
            }
            if let Some(Err(e)) = outbox.as_mut().map(crate::event_outbox::Outbox::sync) {
                tracing::error!(error = %e, "cannot sync the outbox");
            }
        }
        if !batch.is_empty() {
            let result = match bans.as_mut() {
                Some(store) => store.append_all(batch.iter().map(|(_, m)| &**m)),
                None => Err("no ban file".to_owned()),
            };
            if let Err(e) = &result {
                tracing::error!(error = %e, bans = batch.len(), "cannot store bans");
            }
            for (to, moderation) in batch.drain(..) {
                let error = result.as_ref().err().cloned();
                node.send_waiting(me, to, MeshMsg::BanStored { moderation, error });
            }
            continue;
        }
        if node.is_draining() {
            return Ok(());
        }
        if busy.elapsed() < Duration::from_millis(100) {
            // Events keep coming: look again in a moment rather than park,
            // so that no shard rings the doorbell (a system call on each
            // side) for each one; what comes meanwhile is written together.
            // Each look costs a sleep and a wake-up (about 10 µs), so looks
            // are few: 100 a second, whatever the rate of events.
            std::thread::sleep(POLL);
            continue;
        }
        if !node.wait_for_mesh(me, &mut bell)? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(user: &str, channel: Option<&str>, until: Option<u64>) -> Moderation {
        Moderation {
            kind: ModKind::Ban { until },
            user: user.into(),
            channel: channel.map(Into::into),
            reason: Some("why".into()),
            by: "mod".into(),
            at: 10,
            from: None,
            ack: None,
        }
    }

    fn summary(bans: &[Moderation]) -> Vec<(String, Option<String>, ModKind)> {
        let mut v: Vec<_> = bans
            .iter()
            .map(|m| {
                (
                    m.user.to_string(),
                    m.channel.as_ref().map(|c| c.to_string()),
                    m.kind,
                )
            })
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }

    #[test]
    fn bans_survive_a_restart_and_lifted_or_expired_ones_go() {
        let dir = tempdir();
        let path = dir.join("bans.jsonl");
        let (mut store, none) = BanStore::open(&path, 0).unwrap();
        assert!(none.is_empty());
        store.append(&ban("troll", None, None)).unwrap();
        store
            .append(&ban("troll", Some("general"), Some(1_000)))
            .unwrap();
        store.append(&ban("brief", None, Some(50))).unwrap();
        store.append(&ban("lifted", None, None)).unwrap();
        let mut unban = ban("lifted", None, None);
        unban.kind = ModKind::Unban;
        store.append(&unban).unwrap();
        drop(store);
        let (_, bans) = BanStore::open(&path, 100).unwrap();
        assert_eq!(
            summary(&bans),
            [
                ("troll".into(), None, ModKind::Ban { until: None }),
                (
                    "troll".into(),
                    Some("general".into()),
                    ModKind::Ban { until: Some(1_000) }
                ),
            ]
        );
        assert_eq!(bans[0].reason.as_deref(), Some("why"));
        // Compacted: two lines left.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        // An incomplete last line (a crash mid-write) is ignored; a bad
        // line elsewhere refuses to start.
        std::fs::write(&path, format!("{text}{{\"op\":\"ban\",\"us")).unwrap();
        assert_eq!(BanStore::open(&path, 100).unwrap().1.len(), 2);
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        let e = BanStore::open(&path, 100).err().unwrap();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_place_is_an_error() {
        let e = BanStore::open(Path::new("/proc/no/such/dir/bans.jsonl"), 0)
            .err()
            .unwrap();
        assert!(e.contains("/proc/no/such/dir/bans.jsonl"), "{e}");
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "corecast-bans-{}-{}",
            std::process::id(),
            crate::clock::now_ms()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
