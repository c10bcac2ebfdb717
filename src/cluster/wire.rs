//! What one node says to the others through Redis: one typed message,
//! [`NodeMsg`], and one codec (rkyv, as the binary protocol), inside one
//! payload format that every pub/sub message and stored event shares.
//!
//! A published payload is `<offset>:<epoch>:` followed by one or more
//! frames `<length>:<archive>`. Events sequenced by the `sequence` script
//! carry the offset of the first frame (the others follow one by one) and
//! the channel's epoch; everything else carries `0::`. The script writes the
//! header and the frames itself, so a batch of events travels as one
//! message; a stored event (a `log` stream entry) is one archive.

use rkyv::rancor;

use crate::engine::cluster::{ChannelPart, NotificationChange};
use crate::engine::user::NodePresence;
use crate::protocol::ServerMessage;

/// A connection of a node: its node, shard, slot and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WireConn {
    pub node: u64,
    pub shard: u16,
    pub slot: u32,
    pub gen: u32,
    /// The protocol it speaks ([`crate::protocol::Protocol::index`]).
    pub protocol: u8,
}

/// A call operation on its way to the node that holds the call.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CallWire {
    pub call: u64,
    pub user: String,
    /// The asking connection, on the sending node.
    pub from: Option<WireConn>,
    pub ack: Option<u64>,
    pub op: CallWireOp,
}

#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum CallWireOp {
    Answer(Option<String>),
    Reject(Option<String>),
    End,
    /// The candidate as JSON text.
    Ice(String),
    PartyGone,
}

/// Everything one node tells others.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum NodeMsg {
    /// A channel event (on the channel's pub/sub channel; stored in its log
    /// when sequenced). Members of `except` do not get it (typing).
    /// `once`: an event several nodes may relay (a moderation event):
    /// its id, by which a node delivers it once.
    Event {
        origin: u64,
        except: Option<String>,
        once: Option<u64>,
        msg: ServerMessage,
    },
    /// A node's connections in a channel.
    Members { node: u64, count: u32 },
    /// A query of a channel's state from `origin`: each node that follows
    /// the channel answers with its part, of the kind of `like`.
    Query {
        origin: u64,
        token: u64,
        like: ChannelPart,
    },
    /// A node's part of a query (on the asker's own channel).
    Part { token: u64, part: ChannelPart },
    /// An event for a user's connections on the other nodes (on the user's
    /// pub/sub channel), but `skip`.
    ToUser {
        origin: u64,
        skip: Option<WireConn>,
        msg: ServerMessage,
    },
    /// A node's part of a user's presence (on the user's channel).
    Presence(NodePresence),
    /// A change of a user's notifications made on `origin`.
    Notifications {
        origin: u64,
        change: NotificationChange,
    },
    /// The user joined a voice channel on `origin`: its voice anywhere else
    /// ends (one voice channel per user).
    VoiceJoined {
        origin: u64,
        channel: String,
        at: u64,
    },
    /// A call operation for the node that holds the call.
    Call(CallWire),
    /// A frame for a connection of the node whose channel it is on.
    Frame { to: WireConn, frame: Vec<u8> },
    /// A kick, ban or unban (on `cc:moderation`); `token` finds its asker
    /// on `origin`.
    Moderation {
        origin: u64,
        token: u64,
        json: String,
    },
    /// A node that stopped or was taken for gone (on `cc:gone`).
    Gone(u64),
    /// The backend joins the user's connections to `channel` (or takes
    /// them out), asked on `origin` (on the user's channel).
    Subscribe {
        origin: u64,
        channel: String,
        join: bool,
    },
}

pub fn encode(m: &NodeMsg) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(m)
        .expect("node messages always serialize")
        .to_vec()
}

pub fn decode(bytes: &[u8]) -> Result<NodeMsg, String> {
    rkyv::from_bytes::<NodeMsg, rancor::Error>(bytes).map_err(|e| format!("bad archive: {e}"))
}

/// A payload of messages that carry no offset: `0::` and the frames.
pub fn payload(msgs: &[NodeMsg]) -> Vec<u8> {
    let mut out = b"0::".to_vec();
    for m in msgs {
        push_frame(&mut out, &encode(m));
    }
    out
}

/// Appends one frame (`<length>:<archive>`).
pub fn push_frame(out: &mut Vec<u8>, archive: &[u8]) {
    out.extend_from_slice(archive.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(archive);
}

/// A payload read: the offset of its first message (0: not sequenced), the
/// epoch, and the messages (one that does not decode is an error).
pub struct Payload {
    pub offset: u64,
    pub epoch: String,
    pub msgs: Vec<NodeMsg>,
}

pub fn read_payload(p: &[u8]) -> Result<Payload, String> {
    let bad = |what: &str| format!("a payload that is not ours: {what}");
    let (offset, rest) = split_at_colon(p).ok_or_else(|| bad("offset"))?;
    let offset: u64 = std::str::from_utf8(offset)
        .ok()
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| bad("offset"))?;
    let (epoch, mut rest) = split_at_colon(rest).ok_or_else(|| bad("epoch"))?;
    let epoch = std::str::from_utf8(epoch)
        .map_err(|_| bad("epoch"))?
        .to_string();
    let mut msgs = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = split_at_colon(rest).ok_or_else(|| bad("frame"))?;
        let len: usize = std::str::from_utf8(len)
            .ok()
            .and_then(|l| l.parse().ok())
            .filter(|l| *l <= tail.len())
            .ok_or_else(|| bad("frame length"))?;
        msgs.push(decode(&tail[..len])?);
        rest = &tail[len..];
    }
    Ok(Payload {
        offset,
        epoch,
        msgs,
    })
}

fn split_at_colon(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = p.iter().position(|&b| b == b':')?;
    Some((&p[..i], &p[i + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ServerEvent, TypingEvent};

    fn typing(user: &str) -> NodeMsg {
        NodeMsg::Event {
            origin: 7,
            except: Some(user.into()),
            once: None,
            msg: ServerMessage {
                id: None,
                event: ServerEvent::TypingUserStart(TypingEvent {
                    channel_id: "c".into(),
                    user_id: user.into(),
                }),
            },
        }
    }

    #[test]
    fn payloads_round_trip_one_or_many() {
        let p = read_payload(&payload(&[typing("a")])).unwrap();
        assert_eq!((p.offset, p.epoch.as_str(), p.msgs.len()), (0, "", 1));
        assert_eq!(p.msgs[0], typing("a"));
        // As the sequence script writes a batch.
        let mut batch = b"41:e9:".to_vec();
        for u in ["a", "b", "c"] {
            push_frame(&mut batch, &encode(&typing(u)));
        }
        let p = read_payload(&batch).unwrap();
        assert_eq!((p.offset, p.epoch.as_str()), (41, "e9"));
        assert_eq!(p.msgs, vec![typing("a"), typing("b"), typing("c")]);
        let others = [NodeMsg::Gone(3), NodeMsg::Members { node: 1, count: 4 }];
        assert_eq!(read_payload(&payload(&others)).unwrap().msgs, others);
    }

    #[test]
    fn garbage_is_an_error() {
        for bad in [
            &b""[..],
            b"x:y",
            b"1:e:",
            b"1:e:99:abc",
            b"1:e:3:abc",
            b"0::2:ab",
        ] {
            let r = read_payload(bad);
            if bad == b"1:e:" {
                assert!(r.unwrap().msgs.is_empty());
            } else {
                assert!(r.is_err(), "{:?}", String::from_utf8_lossy(bad));
            }
        }
    }
}
