//! Every Redis key and pub/sub channel the cluster uses, in one place.
//!
//! For a corecast channel `C`, a user `U` and a node `N` (the braces are
//! hash tags: a channel's or a user's keys and pub/sub channel share a
//! Redis Cluster slot, so one script can touch them all):
//!
//! | key | type | holds | bounded by |
//! |---|---|---|---|
//! | `cc:{C}:meta` | hash | the channel's `epoch`, last `offset`, and `rid`: the replication id of the Redis that keeps it (another one starts the channel over) | expires `history_ttl_ms` after the last event |
//! | `cc:{C}:log` | stream | the last `history_size` sequenced events (entry id `offset-1`) | `MAXLEN ~ history_size`, the same expiry |
//! | `cc:{C}:nonces` | sorted set | `user\0nonce` of the recent messages that carried a nonce (`\0h\0<id>` of those handed over without one), scored by offset: a message sent again is not published twice | the last `history_size`, the same expiry |
//! | `cc:{C}:members` | hash | each node's connections in the channel | a node's field goes when it has none, stops, or is taken for gone |
//! | `cc:{C}` | pub/sub channel | the channel's events, queries of its state, member counts, for the nodes that follow it | not stored |
//! | `cc:bans` | hash | the bans in force: field `["user","channel"]` (JSON; channel `null` for the server), value the ban as JSON | one field per ban; expired ones are dropped when a node connects |
//! | `cc:moderation` | pub/sub channel | kicks, bans and unbans, for every node | not stored |
//! | `cc:u:{U}` | pub/sub channel | events for user `U`'s connections, changes of its presence and notifications, voice joins, for the nodes where `U` is connected or watched | not stored |
//! | `cc:p:{U}` | hash | user `U`'s presence on each node where it is connected (archive) | one field per node with devices of `U` |
//! | `cc:n:{U}` | hash | user `U`'s notifications: field `<created_at hex>.<id>`, value JSON | at most `max_notifications`; expires `notification_ttl_ms` after the newest |
//! | `cc:c:{U}` | hash | user `U`'s conversations: field the peer, value `<unread>:<timestamp>:<last message as JSON>` | at most `max_conversations`; expires `notification_ttl_ms` after the last message |
//! | `cc:s:{U}:<session>` | string | a dropped session that may be resumed on any node (archive) | expires `resume_window_ms` after the drop; taken once |
//! | `{cc}:nodes` | sorted set | the live nodes, scored by their last heartbeat (Redis time, ms) | one member per node |
//! | `{cc}:beat` | string | when a node last beat (Redis time): a pause of Redis itself is not taken for every node going silent | one |
//! | `cc:node:{N}:users`, `cc:node:{N}:channels` | sets | the users and channels node `N` has a field of (to clean up after it) | removed with the node |
//! | `cc:to:{N}` | pub/sub channel | node `N`'s own: call operations, frames for its connections, other nodes' parts of its queries, sessions it asked for | not stored |
//! | `cc:gone` | pub/sub channel | ids of nodes that stopped or were taken for gone | not stored |

pub const BANS: &str = "cc:bans";
pub const MODERATION: &str = "cc:moderation";
pub const NODES: &str = "{cc}:nodes";
pub const NODES_BEAT: &str = "{cc}:beat";
pub const GONE: &str = "cc:gone";

/// A node's id as Redis shows it.
pub fn node_name(node: u64) -> String {
    format!("{node:016x}")
}

pub fn parse_node(name: &str) -> Option<u64> {
    u64::from_str_radix(name, 16).ok()
}

/// A channel's pub/sub channel.
pub fn channel(channel: &str) -> String {
    format!("cc:{{{channel}}}")
}

/// A channel's `meta`, `log` and `nonces` keys.
pub fn channel_keys(channel: &str) -> [String; 3] {
    [
        format!("cc:{{{channel}}}:meta"),
        format!("cc:{{{channel}}}:log"),
        format!("cc:{{{channel}}}:nonces"),
    ]
}

pub fn members(channel: &str) -> String {
    format!("cc:{{{channel}}}:members")
}

/// The corecast channel a pub/sub channel name stands for.
pub fn channel_of(name: &str) -> Option<&str> {
    name.strip_prefix("cc:{")?.strip_suffix('}')
}

/// A user's pub/sub channel.
pub fn user(user: &str) -> String {
    format!("cc:u:{{{user}}}")
}

/// The user a user channel name stands for.
pub fn user_of(name: &str) -> Option<&str> {
    name.strip_prefix("cc:u:{")?.strip_suffix('}')
}

pub fn presence(user: &str) -> String {
    format!("cc:p:{{{user}}}")
}

pub fn notifications(user: &str) -> String {
    format!("cc:n:{{{user}}}")
}

pub fn conversations(user: &str) -> String {
    format!("cc:c:{{{user}}}")
}

pub fn session(user: &str, session: &str) -> String {
    format!("cc:s:{{{user}}}:{session}")
}

pub fn node_users(node: &str) -> String {
    format!("cc:node:{{{node}}}:users")
}

pub fn node_channels(node: &str) -> String {
    format!("cc:node:{{{node}}}:channels")
}

/// A node's own pub/sub channel.
pub fn node_channel(node: u64) -> String {
    format!("cc:to:{{{}}}", node_name(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(channel_of(&channel("team:7")), Some("team:7"));
        assert_eq!(user_of(&user("al{ice")), Some("al{ice"));
        assert_eq!(channel_of("cc:u:{x}"), None);
        assert_eq!(parse_node(&node_name(0xfeed)), Some(0xfeed));
        assert_eq!(channel_keys("c")[2], "cc:{c}:nonces");
    }
}
