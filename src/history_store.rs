//! The history of a single node, kept on disk so that it survives a
//! restart: one JSON line per sequenced channel event (a message, an edit,
//! a deletion, a reaction), appended by the store's thread (the ban store's,
//! an endpoint of the mesh) as owner shards send them, and read back when
//! the node starts, so channels keep their epochs, offsets, messages and
//! what recovery by offset replays. In a cluster, Redis holds all this and
//! the file is not used.
//!
//! Lines are written in batches (one `write` for what came together) and
//! synced once a second: a kill loses nothing that was written, a power cut
//! at most the last second. The file is compacted when the node starts,
//! and again each time it grows past four times what it kept (64 MiB at
//! least): per channel, the last `history_size` events of its last epoch
//! that are younger than `history_ttl_ms`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::engine::history::{Line, Record};

/// What compaction keeps of a channel: `history_size` events of its last
/// epoch, younger than `history_ttl_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    pub events: usize,
    pub ttl_ms: u64,
}

pub struct HistoryStore {
    path: PathBuf,
    file: File,
    keep: Keep,
    /// Bytes in the file, and after the last compaction.
    len: u64,
    compacted_len: u64,
    unsynced: bool,
}

impl HistoryStore {
    /// Opens (or creates) the file, compacts it, and returns what it keeps.
    pub fn open(path: &Path, keep: Keep, now: u64) -> Result<(HistoryStore, Vec<Record>), String> {
        let what = |e: std::io::Error| format!("history file {}: {e}", path.display());
        let kept = compact(path, keep, now).map_err(what)?;
        let file = OpenOptions::new().append(true).open(path).map_err(what)?;
        let len = file.metadata().map_err(what)?.len();
        let records = kept
            .iter()
            .filter_map(|l| serde_json::from_str::<Line>(l).ok()?.record())
            .collect();
        let store = HistoryStore {
            path: path.to_path_buf(),
            file,
            keep,
            len,
            compacted_len: len,
            unsynced: false,
        };
        Ok((store, records))
    }

    /// Appends lines (each ending in a newline) with one write.
    pub fn append(&mut self, lines: &[u8], now: u64) -> Result<(), String> {
        if lines.is_empty() {
            return Ok(());
        }
        let what = |e: std::io::Error| format!("history file {}: {e}", self.path.display());
        self.file.write_all(lines).map_err(what)?;
        self.len += lines.len() as u64;
        self.unsynced = true;
        // Four times what the last compaction kept (and past a floor):
        // compact. Each line appended is read about once by compaction.
        if self.len > (4 * self.compacted_len).max(64 << 20) {
            compact(&self.path, self.keep, now).map_err(what)?;
            self.file = OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(what)?;
            self.len = self.file.metadata().map_err(what)?.len();
            self.compacted_len = self.len;
        }
        Ok(())
    }

    /// Syncs what was written since the last sync.
    pub fn sync(&mut self) -> Result<(), String> {
        if !self.unsynced {
            return Ok(());
        }
        self.unsynced = false;
        self.file
            .sync_data()
            .map_err(|e| format!("history file {}: {e}", self.path.display()))
    }
}

/// Rewrites the file with what it keeps (through a temporary file and a
/// rename), and returns that, oldest first. An incomplete last line (a
/// write cut by a kill) is dropped; other unreadable lines too, with a
/// warning.
fn compact(path: &Path, keep: Keep, now: u64) -> std::io::Result<Vec<String>> {
    /// What compaction reads of a line: the event itself is skipped.
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, alias = "c")]
        channel: std::borrow::Cow<'a, str>,
        #[serde(borrow, alias = "e")]
        epoch: std::borrow::Cow<'a, str>,
        at: u64,
    }
    struct Kept {
        epoch: String,
        lines: std::collections::VecDeque<(u64, String)>,
    }
    // Lines as `line` writes them are read by hand, up to `at`: the event
    // itself is not parsed. Others go through serde.
    fn head(text: &str) -> Option<(std::borrow::Cow<'_, str>, &str, u64)> {
        const START: &str = r#"{"channel":""#;
        let rest = text.strip_prefix(START)?;
        let b = rest.as_bytes();
        let mut i = 0;
        let mut escaped = false;
        while i < b.len() && b[i] != b'"' {
            if b[i] == b'\\' {
                escaped = true;
                i += 1;
            }
            i += 1;
        }
        let channel = match escaped {
            false => std::borrow::Cow::Borrowed(rest.get(..i)?),
            true => {
                let quoted = &text[START.len() - 1..START.len() + i + 1];
                std::borrow::Cow::Owned(serde_json::from_str(quoted).ok()?)
            }
        };
        let rest = rest.get(i..)?.strip_prefix(r#"","epoch":""#)?;
        let (epoch, rest) = rest.split_once('"')?;
        let rest = rest.strip_prefix(r#","offset":"#)?;
        let (_, rest) = rest.split_once(r#","at":"#)?;
        let (at, _) = rest.split_once(',')?;
        Some((channel, epoch, at.parse().ok()?))
    }
    let mut by_channel: HashMap<String, Kept> = HashMap::new();
    let mut bad = 0usize;
    match File::open(path) {
        Ok(f) => {
            for text in BufReader::new(f).lines() {
                let text = text?;
                if text.trim().is_empty() {
                    continue;
                }
                let (channel, epoch, at) = match head(&text) {
                    Some((c, e, at)) => (c.into_owned(), e.to_owned(), at),
                    None => match serde_json::from_str::<Head>(&text) {
                        Ok(h) => (h.channel.into_owned(), h.epoch.into_owned(), h.at),
                        Err(_) => {
                            bad += 1;
                            continue;
                        }
                    },
                };
                let k = by_channel.entry(channel).or_insert_with(|| Kept {
                    epoch: epoch.clone(),
                    lines: Default::default(),
                });
                // A new epoch starts the channel over.
                if k.epoch != epoch {
                    k.epoch = epoch;
                    k.lines.clear();
                }
                k.lines.push_back((at, text));
                if k.lines.len() > keep.events {
                    k.lines.pop_front();
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if bad > 0 {
        tracing::warn!(file = %path.display(), lines = bad, "history: skipped unreadable lines");
    }
    let mut kept: Vec<(u64, String)> = by_channel
        .into_values()
        .flat_map(|k| k.lines)
        .filter(|(at, _)| now.saturating_sub(*at) <= keep.ttl_ms)
        .collect();
    kept.sort_by_key(|(at, _)| *at);
    let tmp = path.with_extension("tmp");
    {
        let mut w = BufWriter::new(File::create(&tmp)?);
        for (_, l) in &kept {
            w.write_all(l.as_bytes())?;
            w.write_all(b"\n")?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(kept.into_iter().map(|(_, l)| l).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::history::line;
    use crate::protocol::{MessageNew, ServerEvent, ServerMessage};

    fn msg(channel: &str, epoch: &str, offset: u64, content: &str) -> ServerMessage {
        ServerMessage::event(ServerEvent::MessageNew(MessageNew {
            message_id: format!("{epoch}-{offset}"),
            channel_id: channel.into(),
            user_id: "u".into(),
            content: content.into(),
            reply_to: None,
            thread_id: None,
            mentions: vec![],
            nonce: None,
            offset,
            timestamp: 1,
            meta: Some(crate::protocol::Json(format!(r#"{{"n":{offset}}}"#))),
        }))
    }

    fn contents(r: &[Record]) -> Vec<(String, u64)> {
        r.iter().map(|r| (r.channel.clone(), r.offset)).collect()
    }

    #[test]
    fn what_is_appended_comes_back_compacted() {
        let dir = std::env::temp_dir().join(format!("cc-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.jsonl");
        let _ = std::fs::remove_file(&path);
        let keep = Keep {
            events: 2,
            ttl_ms: 1_000,
        };
        let (mut s, none) = HistoryStore::open(&path, keep, 10_000).unwrap();
        assert!(none.is_empty());
        let mut batch = Vec::new();
        for (c, e, o, at) in [
            ("a", "e1", 1, 9_000),
            ("a", "e1", 2, 9_500),
            ("a", "e1", 3, 9_600),
            ("b", "x1", 1, 9_700),
            ("b", "x2", 1, 9_800),
            ("old", "o", 1, 100),
            ("q\"x\\", "e", 7, 9_900),
        ] {
            batch.extend(line(c, e, o, at, &msg(c, e, o, "hi"), None));
        }
        // A line of a file written before the long names.
        let modern = String::from_utf8(line(
            "legacy",
            "l1",
            5,
            9_950,
            &msg("legacy", "l1", 5, "hi"),
            None,
        ))
        .unwrap();
        let old = modern
            .replacen("\"channel\":", "\"c\":", 1)
            .replacen("\"epoch\":", "\"e\":", 1)
            .replacen("\"offset\":", "\"o\":", 1)
            .replacen("\"event\":", "\"m\":", 1);
        batch.extend_from_slice(old.as_bytes());
        s.append(&batch, 10_000).unwrap();
        // A write cut short by a kill.
        s.append(br#"{"channel":"a","epoch":"e1","offset":4"#, 10_000)
            .unwrap();
        drop(s);
        let (_, back) = HistoryStore::open(&path, keep, 10_000).unwrap();
        // a: the last two; b: its last epoch only; old: expired.
        let mut got = contents(&back);
        got.sort();
        let want: Vec<(String, u64)> = vec![
            ("a".into(), 2),
            ("a".into(), 3),
            ("b".into(), 1),
            ("legacy".into(), 5),
            ("q\"x\\".into(), 7),
        ];
        assert_eq!(got, want);
        let b = back.iter().find(|r| r.channel == "b").unwrap();
        assert_eq!(b.at, 9_800);
        assert_eq!(b.epoch, "x2");
        assert_eq!(b.msg, msg("b", "x2", 1, "hi"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
