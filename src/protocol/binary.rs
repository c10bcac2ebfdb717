//! The compact binary encoding (`corecast.bin`): each WebSocket binary
//! message is one rkyv archive of a [`ClientMessage`] or [`ServerMessage`].
//! The archive format is little-endian, unaligned and uses 32-bit relative
//! pointers, so it can be validated and read at any offset of a frame.
//! Client archives are validated before anything is read from them.

use rkyv::rancor;

use super::events::*;
use super::DecodeError;

/// Validates and decodes a client archive.
pub fn decode_client(buf: &[u8]) -> Result<ClientMessage, DecodeError> {
    rkyv::from_bytes::<ClientMessage, rancor::Error>(buf)
        .map_err(|e| DecodeError::new(None, format!("invalid binary envelope: {e}")))
}

/// Validates a client archive and reads its ack id without decoding it.
pub fn peek_client_id(buf: &[u8]) -> Option<u64> {
    rkyv::access::<ArchivedClientMessage, rancor::Error>(buf)
        .ok()
        .and_then(|m| m.id.as_ref().map(|id| id.to_native()))
}

/// Appends the archive of a server message to `out`.
pub fn encode_server(msg: &ServerMessage, out: &mut Vec<u8>) {
    let bytes = rkyv::to_bytes::<rancor::Error>(msg).expect("server messages always serialize");
    out.extend_from_slice(&bytes);
}

/// The archive of a client message (client side).
pub fn encode_client(msg: &ClientMessage) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(msg)
        .expect("client messages always serialize")
        .to_vec()
}

/// Validates and decodes a server archive (client side).
pub fn decode_server(buf: &[u8]) -> Result<ServerMessage, DecodeError> {
    rkyv::from_bytes::<ServerMessage, rancor::Error>(buf)
        .map_err(|e| DecodeError::new(None, format!("invalid binary envelope: {e}")))
}

#[cfg(test)]
mod tests {
    use super::super::json;
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn client_event() -> impl Strategy<Value = ClientEvent> {
        prop_oneof![
            text().prop_map(|token| ClientEvent::Auth(Auth { token })),
            Just(ClientEvent::Heartbeat),
            text().prop_map(|c| ClientEvent::ChannelJoin(ChannelRef { channel_id: c })),
            text().prop_map(|c| ClientEvent::ChannelLeave(ChannelRef { channel_id: c })),
            (text(), text(), proptest::option::of(text())).prop_map(
                |(channel_id, content, reply_to)| {
                    ClientEvent::MessageSend(MessageSend {
                        channel_id,
                        content,
                        reply_to,
                    })
                }
            ),
            "[a-z]{1,8}:[a-z_]{1,12}".prop_map(ClientEvent::Unsupported),
        ]
    }

    fn server_event() -> impl Strategy<Value = ServerEvent> {
        prop_oneof![
            (text(), text(), any::<u32>(), any::<u64>()).prop_map(|(u, s, shard, h)| {
                ServerEvent::Ready(Ready {
                    user_id: u,
                    session_id: s,
                    shard,
                    heartbeat_interval_ms: h,
                })
            }),
            (text(), text(), any::<u64>(), any::<u64>()).prop_map(|(m, c, o, t)| ServerEvent::Ack(
                AckBody::Send(SendAck {
                    message_id: m,
                    channel_id: c,
                    offset: o,
                    timestamp: t
                })
            )),
            (text(), any::<u64>(), text(), any::<u32>()).prop_map(|(c, o, e, n)| ServerEvent::Ack(
                AckBody::Join(JoinAck {
                    channel_id: c,
                    offset: o,
                    epoch: e,
                    members: n
                })
            )),
            Just(ServerEvent::Ack(AckBody::Empty(Empty {}))),
            (text(), proptest::option::of(any::<u64>())).prop_map(|(m, r)| ServerEvent::Error(
                ErrorBody {
                    code: ErrorCode::RateLimited,
                    message: m,
                    retry_after_ms: r
                }
            )),
            any::<u64>().prop_map(|t| ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: t })),
            (text(), text(), proptest::option::of(text()), any::<u64>()).prop_map(
                |(c, content, r, o)| {
                    ServerEvent::MessageNew(MessageNew {
                        message_id: format!("m{o}"),
                        channel_id: c,
                        user_id: "u".into(),
                        content,
                        reply_to: r,
                        offset: o,
                        timestamp: o / 2,
                    })
                }
            ),
            (text(), text()).prop_map(|(c, u)| ServerEvent::MemberJoined(MemberEvent {
                channel_id: c,
                user_id: u,
                session_id: "s".into()
            })),
            (text(), text()).prop_map(|(c, u)| ServerEvent::MemberLeft(MemberEvent {
                channel_id: c,
                user_id: u,
                session_id: "s".into()
            })),
        ]
    }

    proptest! {
        #[test]
        fn client_json_and_binary_agree(id in proptest::option::of(any::<u64>()), event in client_event()) {
            let msg = ClientMessage { id, event };
            let mut j = Vec::new();
            json::encode_client(&msg, &mut j);
            let from_json = json::decode_client(&mut j, &mut json::Scratch::default()).unwrap();
            let from_bin = decode_client(&encode_client(&msg)).unwrap();
            prop_assert_eq!(&from_json, &msg);
            prop_assert_eq!(&from_bin, &msg);
            prop_assert_eq!(peek_client_id(&encode_client(&msg)), id);
        }

        #[test]
        fn server_json_and_binary_agree(id in proptest::option::of(any::<u64>()), event in server_event()) {
            let msg = ServerMessage { id, event };
            let mut j = Vec::new();
            json::encode_server(&msg, &mut j);
            let mut b = Vec::new();
            encode_server(&msg, &mut b);
            prop_assert_eq!(json::decode_server(&j).unwrap(), msg.clone());
            prop_assert_eq!(decode_server(&b).unwrap(), msg);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_client(&bytes);
            let mut b = bytes.clone();
            let _ = json::decode_client(&mut b, &mut json::Scratch::default());
        }
    }

    #[test]
    fn archives_work_at_odd_offsets() {
        let msg = ClientMessage {
            id: Some(5),
            event: ClientEvent::Heartbeat,
        };
        let bytes = encode_client(&msg);
        let mut shifted = vec![0u8; 3];
        shifted.extend_from_slice(&bytes);
        assert_eq!(decode_client(&shifted[3..]).unwrap(), msg);
    }
}
