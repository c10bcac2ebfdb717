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
    use proptest::option::of;
    use proptest::prelude::*;

    /// The fuzz corpus of the binary protocol holds the binary encoding of
    /// every seed of the JSON one (both valid envelopes), so that fuzzing
    /// starts from archives the decoder accepts and reaches its deep paths.
    /// When the format changes, this fails: write them again with
    /// `CORECAST_WRITE_SEEDS=1 cargo test -p corecast-protocol fuzz_seeds`.
    #[test]
    fn the_fuzz_seeds_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let write = std::env::var_os("CORECAST_WRITE_SEEDS").is_some();
        let mut seeds = 0;
        for entry in std::fs::read_dir(root.join("json_envelope")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_owned();
            let mut text = std::fs::read(&path).unwrap();
            let msg = json::decode_client(&mut text, &mut json::Scratch::default())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let archive = encode_client(&msg);
            let bin = root.join("binary_envelope").join(&name);
            if write {
                std::fs::write(&bin, &archive).unwrap();
            }
            let stored = std::fs::read(&bin).unwrap_or_default();
            assert!(
                stored == archive,
                "{} is stale: CORECAST_WRITE_SEEDS=1 cargo test --lib fuzz_seeds",
                bin.display()
            );
            assert_eq!(decode_client(&stored).unwrap(), msg);
            seeds += 1;
        }
        assert!(seeds >= 10);
    }

    fn text() -> impl Strategy<Value = String> {
        ".{0,40}"
    }

    fn texts() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec(text(), 0..4)
    }

    /// JSON text as both codecs give it back: compact, objects of one key.
    fn json_value() -> impl Strategy<Value = Json> {
        prop_oneof![
            any::<u32>().prop_map(|n| Json(n.to_string())),
            "[a-z ]{0,10}".prop_map(|s| Json(format!("\"{s}\""))),
            ("[a-z]{1,6}", "[a-z0-9 ]{0,10}")
                .prop_map(|(k, v)| Json(format!("{{\"{k}\":\"{v}\"}}"))),
        ]
    }

    fn status() -> impl Strategy<Value = Status> {
        proptest::sample::select(Status::ALL)
    }

    fn device() -> impl Strategy<Value = DeviceKind> {
        proptest::sample::select(DeviceKind::ALL)
    }

    fn activity() -> impl Strategy<Value = Activity> {
        (text(), text(), of(text())).prop_map(|(kind, name, details)| Activity {
            kind,
            name,
            details,
        })
    }

    fn channel() -> impl Strategy<Value = ChannelRef> {
        text().prop_map(|channel_id| ChannelRef { channel_id })
    }

    fn message() -> impl Strategy<Value = MessageRef> {
        (text(), text()).prop_map(|(channel_id, message_id)| MessageRef {
            channel_id,
            message_id,
        })
    }

    fn users() -> impl Strategy<Value = UserIds> {
        texts().prop_map(|user_ids| UserIds { user_ids })
    }

    fn client_event() -> impl Strategy<Value = ClientEvent> {
        use ClientEvent as E;
        let a = prop_oneof![
            text().prop_map(|token| E::Auth(Auth { token })),
            text().prop_map(|token| E::AuthRefresh(Auth { token })),
            (text(), prop::option::of(json_value()))
                .prop_map(|(method, data)| E::Rpc(RpcCall { method, data })),
            (text(), text()).prop_map(|(name, channel_id)| E::Custom(
                format!("app:{name}"),
                CustomSend {
                    channel_id,
                    data: Some(Json("{\"k\":[1,true]}".into())),
                }
            )),
            Just(E::Heartbeat),
            (
                text(),
                proptest::collection::vec((text(), any::<u64>(), text()), 0..3)
            )
                .prop_map(|(session_id, p)| E::SessionResume(SessionResume {
                    session_id,
                    positions: p
                        .into_iter()
                        .map(|(channel_id, offset, epoch)| Position {
                            channel_id,
                            offset,
                            epoch
                        })
                        .collect(),
                })),
            (text(), of((any::<u64>(), text())), of(text())).prop_map(
                |(channel_id, since, token)| E::ChannelJoin(ChannelJoin {
                    channel_id,
                    since: since.map(|(offset, epoch)| Since { offset, epoch }),
                    token,
                })
            ),
            channel().prop_map(E::ChannelLeave),
            (text(), of(any::<u32>()), of(any::<u64>())).prop_map(|(channel_id, limit, before)| {
                E::ChannelGetHistory(GetHistory {
                    channel_id,
                    limit,
                    before,
                })
            }),
            channel().prop_map(E::ChannelGetMembers),
            (text(), text(), of(text()), of(text()), texts(), of(text())).prop_map(
                |(channel_id, content, reply_to, thread_id, mentions, nonce)| {
                    E::MessageSend(MessageSend {
                        channel_id,
                        content,
                        reply_to,
                        thread_id,
                        mentions,
                        nonce,
                    })
                }
            ),
            (text(), text(), text()).prop_map(|(channel_id, message_id, content)| {
                E::MessageEdit(MessageEdit {
                    channel_id,
                    message_id,
                    content,
                })
            }),
            message().prop_map(E::MessageDelete),
            (text(), text(), text(), any::<bool>()).prop_map(|(c, m, emoji, add)| {
                E::MessageReact(MessageReact {
                    channel_id: c,
                    message_id: m,
                    emoji,
                    action: if add {
                        ReactAction::Add
                    } else {
                        ReactAction::Remove
                    },
                })
            }),
            message().prop_map(E::MessageDelivered),
            message().prop_map(E::MessageMarkRead),
            message().prop_map(E::MessageGetReadReceipts),
        ];
        let b = prop_oneof![
            (text(), text(), of(text())).prop_map(|(to_user_id, content, nonce)| E::DmSend(
                DmSend {
                    to_user_id,
                    content,
                    nonce
                }
            )),
            of(any::<u32>()).prop_map(|limit| E::DmGetConversations(Limit { limit })),
            (
                of(status()),
                of(of(text())),
                of(of(activity())),
                of(device())
            )
                .prop_map(|(status, custom_status, activity, device)| {
                    E::PresenceUpdate(PresenceUpdate {
                        status,
                        custom_status,
                        activity,
                        device,
                    })
                }),
            users().prop_map(E::PresenceSubscribe),
            users().prop_map(E::PresenceUnsubscribe),
            users().prop_map(E::PresenceGetBulk),
            Just(E::PresenceHeartbeat),
            channel().prop_map(E::TypingStart),
            channel().prop_map(E::TypingStop),
            channel().prop_map(E::TypingGetActive),
            channel().prop_map(E::VoiceJoin),
            Just(E::VoiceLeave),
            (
                of(any::<bool>()),
                of(any::<bool>()),
                of(any::<bool>()),
                of(any::<bool>()),
                of(any::<bool>())
            )
                .prop_map(|(muted, deafened, speaking, video, screen_share)| {
                    E::VoiceUpdate(VoiceUpdate {
                        muted,
                        deafened,
                        speaking,
                        video,
                        screen_share,
                    })
                }),
            channel().prop_map(E::VoiceGetParticipants),
        ];
        let c = prop_oneof![
            (text(), any::<bool>(), of(text())).prop_map(|(to_user_id, video, sdp)| {
                E::CallInitiate(CallInitiate {
                    to_user_id,
                    call_type: if video {
                        CallType::Video
                    } else {
                        CallType::Audio
                    },
                    sdp,
                })
            }),
            (text(), of(text()))
                .prop_map(|(call_id, sdp)| E::CallAnswer(CallAnswer { call_id, sdp })),
            (text(), of(text()))
                .prop_map(|(call_id, reason)| E::CallReject(CallReject { call_id, reason })),
            text().prop_map(|call_id| E::CallEnd(CallRef { call_id })),
            (text(), json_value()).prop_map(|(call_id, candidate)| E::CallIceCandidate(CallIce {
                call_id,
                candidate
            })),
            Just(E::NotificationGetPending),
            texts().prop_map(|notification_ids| E::NotificationRead(NotificationIds {
                notification_ids
            })),
            text().prop_map(|notification_id| E::NotificationClear(NotificationRef {
                notification_id
            })),
            Just(E::NotificationClearAll),
            (text(), of(text()), of(text())).prop_map(|(user_id, channel_id, reason)| {
                E::ModerationKickUser(KickUser {
                    user_id,
                    channel_id,
                    reason,
                })
            }),
            (text(), of(text()), of(any::<u64>()), of(text())).prop_map(
                |(user_id, channel_id, duration_ms, reason)| E::ModerationBanUser(BanUser {
                    user_id,
                    channel_id,
                    duration_ms,
                    reason,
                })
            ),
            "x[a-z]{1,8}:[a-z_]{1,12}".prop_map(E::Unsupported),
        ];
        prop_oneof![a, b, c]
    }

    fn moderation() -> impl Strategy<Value = ModerationEvent> {
        (text(), of(text()), of(text()), text(), of(any::<u64>())).prop_map(
            |(user_id, channel_id, reason, by, until)| ModerationEvent {
                user_id,
                channel_id,
                reason,
                by,
                until,
            },
        )
    }

    fn message_new() -> impl Strategy<Value = MessageNew> {
        (
            text(),
            text(),
            of(text()),
            of(text()),
            texts(),
            of(text()),
            any::<u64>(),
            of("[a-z]{1,8}".prop_map(|k| Json(format!(r#"{{"{k}":[1,"x"]}}"#)))),
        )
            .prop_map(
                |(c, content, reply_to, thread_id, mentions, nonce, o, meta)| MessageNew {
                    message_id: format!("m{o}"),
                    channel_id: c,
                    user_id: "u".into(),
                    content,
                    reply_to,
                    thread_id,
                    mentions,
                    nonce,
                    offset: o,
                    timestamp: o / 2,
                    meta,
                },
            )
    }

    fn presence() -> impl Strategy<Value = PresenceView> {
        (
            text(),
            status(),
            of(text()),
            of(activity()),
            proptest::collection::vec(device(), 0..3),
            any::<u64>(),
        )
            .prop_map(
                |(user_id, status, custom_status, activity, devices, last_seen)| PresenceView {
                    user_id,
                    status,
                    custom_status,
                    activity,
                    devices,
                    last_seen,
                },
            )
    }

    fn voice_state() -> impl Strategy<Value = VoiceState> {
        any::<[bool; 5]>().prop_map(|b| VoiceState {
            muted: b[0],
            deafened: b[1],
            speaking: b[2],
            video: b[3],
            screen_share: b[4],
        })
    }

    fn dm() -> impl Strategy<Value = DmMessage> {
        (text(), text(), text(), of(text()), any::<u64>()).prop_map(
            |(from, to, content, nonce, t)| DmMessage {
                message_id: format!("d{t}"),
                from_user_id: from,
                to_user_id: to,
                content,
                nonce,
                timestamp: t,
            },
        )
    }

    fn notification() -> impl Strategy<Value = Notification> {
        (
            text(),
            text(),
            of(json_value()),
            any::<bool>(),
            any::<u64>(),
        )
            .prop_map(|(notification_id, kind, data, read, t)| Notification {
                notification_id,
                kind,
                data,
                read,
                created_at: t / 2,
                expires_at: t,
            })
    }

    fn call_event() -> impl Strategy<Value = CallEvent> {
        (text(), text(), of(text()), of(text())).prop_map(|(call_id, user_id, reason, sdp)| {
            CallEvent {
                call_id,
                user_id,
                reason,
                sdp,
            }
        })
    }

    fn ack() -> impl Strategy<Value = AckBody> {
        let a = prop_oneof![
            (
                text(),
                text(),
                any::<u64>(),
                any::<u64>(),
                of(text()),
                any::<bool>()
            )
                .prop_map(|(m, c, o, t, nonce, duplicate)| AckBody::Send(SendAck {
                    message_id: m,
                    channel_id: c,
                    offset: o,
                    timestamp: t,
                    nonce,
                    duplicate,
                })),
            (
                text(),
                any::<u64>(),
                text(),
                any::<u32>(),
                of(any::<bool>())
            )
                .prop_map(|(c, o, e, n, recovered)| AckBody::Join(JoinAck {
                    channel_id: c,
                    offset: o,
                    epoch: e,
                    members: n,
                    recovered,
                })),
            (text(), text(), any::<u64>()).prop_map(|(c, m, o)| AckBody::Event(EventAck {
                channel_id: c,
                message_id: m,
                offset: o
            })),
            (
                text(),
                proptest::collection::vec(
                    (
                        message_new(),
                        of(any::<u64>()),
                        proptest::collection::vec((text(), any::<u32>(), texts()), 0..2)
                    ),
                    0..3
                ),
                any::<bool>()
            )
                .prop_map(|(c, ms, has_more)| AckBody::History(HistoryAck {
                    channel_id: c,
                    messages: ms
                        .into_iter()
                        .map(|(message, edited_at, r)| HistoryMessage {
                            message,
                            edited_at,
                            reactions: r
                                .into_iter()
                                .map(|(emoji, count, user_ids)| ReactionCount {
                                    emoji,
                                    count,
                                    user_ids
                                })
                                .collect(),
                        })
                        .collect(),
                    has_more,
                })),
            (
                text(),
                proptest::collection::vec((text(), any::<u32>()), 0..3)
            )
                .prop_map(|(c, m)| {
                    AckBody::Members(MembersAck {
                        channel_id: c,
                        members: m
                            .into_iter()
                            .map(|(user_id, connections)| MemberInfo {
                                user_id,
                                connections,
                            })
                            .collect(),
                    })
                }),
            (
                text(),
                text(),
                proptest::collection::vec((text(), any::<u64>()), 0..3)
            )
                .prop_map(|(c, m, r)| AckBody::ReadReceipts(ReadReceiptsAck {
                    channel_id: c,
                    message_id: m,
                    readers: r
                        .into_iter()
                        .map(|(user_id, timestamp)| Reader { user_id, timestamp })
                        .collect(),
                })),
            (text(), text(), any::<u64>(), any::<bool>()).prop_map(|(m, to, t, duplicate)| {
                AckBody::Dm(DmAck {
                    message_id: m,
                    to_user_id: to,
                    timestamp: t,
                    duplicate,
                })
            }),
        ];
        let b = prop_oneof![
            proptest::collection::vec((text(), dm(), any::<u32>()), 0..3).prop_map(|c| {
                AckBody::Conversations(ConversationsAck {
                    conversations: c
                        .into_iter()
                        .map(|(user_id, last_message, unread)| Conversation {
                            user_id,
                            last_message,
                            unread,
                        })
                        .collect(),
                })
            }),
            proptest::collection::vec(presence(), 0..3)
                .prop_map(|presences| AckBody::Presences(PresencesAck { presences })),
            (text(), texts()).prop_map(|(channel_id, user_ids)| AckBody::Typing(TypingAck {
                channel_id,
                user_ids
            })),
            (
                text(),
                proptest::collection::vec((text(), voice_state()), 0..3),
                of(text()),
                of(text())
            )
                .prop_map(|(channel_id, p, token, server_url)| AckBody::Voice(
                    VoiceAck {
                        channel_id,
                        participants: p
                            .into_iter()
                            .map(|(user_id, state)| VoiceParticipant { user_id, state })
                            .collect(),
                        token,
                        server_url,
                    }
                )),
            text().prop_map(|call_id| AckBody::Call(CallAck { call_id })),
            proptest::collection::vec(notification(), 0..3).prop_map(|notifications| {
                AckBody::Notifications(NotificationsAck { notifications })
            }),
            (
                text(),
                proptest::collection::vec((text(), any::<bool>(), any::<u64>(), text()), 0..3)
            )
                .prop_map(|(session_id, c)| AckBody::Resume(ResumeAck {
                    session_id,
                    channels: c
                        .into_iter()
                        .map(|(channel_id, recovered, offset, epoch)| ResumedChannel {
                            channel_id,
                            recovered,
                            offset,
                            epoch,
                        })
                        .collect(),
                })),
            Just(AckBody::Empty(Empty {})),
        ];
        prop_oneof![a, b]
    }

    fn server_event() -> impl Strategy<Value = ServerEvent> {
        use ServerEvent as S;
        let a = prop_oneof![
            (text(), text(), any::<u32>(), any::<u64>()).prop_map(|(u, s, shard, h)| {
                S::Ready(Ready {
                    user_id: u,
                    session_id: s,
                    shard,
                    heartbeat_interval_ms: h,
                })
            }),
            ack().prop_map(S::Ack),
            (text(), of(any::<u64>())).prop_map(|(m, r)| S::Error(ErrorBody {
                code: ErrorCode::RateLimited,
                message: m,
                retry_after_ms: r
            })),
            any::<u64>().prop_map(|t| S::HeartbeatAck(HeartbeatAck { timestamp: t })),
            (text(), text(), text()).prop_map(|(c, u, s)| S::MemberJoined(MemberEvent {
                channel_id: c,
                user_id: u,
                session_id: s
            })),
            (text(), text(), text()).prop_map(|(c, u, s)| S::MemberLeft(MemberEvent {
                channel_id: c,
                user_id: u,
                session_id: s
            })),
            message_new().prop_map(S::MessageNew),
            (text(), text(), any::<u64>()).prop_map(|(c, content, o)| S::MessageEdited(
                MessageEdited {
                    message_id: format!("m{o}"),
                    channel_id: c,
                    user_id: "u".into(),
                    content,
                    offset: o,
                    edited_at: o / 3,
                }
            )),
            (text(), any::<u64>()).prop_map(|(c, o)| S::MessageDeleted(MessageDeleted {
                message_id: format!("m{o}"),
                channel_id: c,
                user_id: "u".into(),
                offset: o,
                timestamp: o / 3,
            })),
            (text(), text(), any::<bool>(), any::<u32>(), any::<u64>()).prop_map(
                |(c, emoji, add, count, o)| S::MessageReaction(MessageReaction {
                    message_id: format!("m{o}"),
                    channel_id: c,
                    user_id: "u".into(),
                    emoji,
                    action: if add {
                        ReactAction::Add
                    } else {
                        ReactAction::Remove
                    },
                    count,
                    offset: o,
                    timestamp: o / 3,
                })
            ),
            (text(), text(), any::<u64>()).prop_map(|(c, u, t)| S::MessageDelivery(
                MessageDelivery {
                    message_id: "m".into(),
                    channel_id: c,
                    user_id: u,
                    timestamp: t,
                }
            )),
            (text(), text(), any::<u64>()).prop_map(|(c, u, o)| S::MessageReadReceipt(
                ReadReceipt {
                    channel_id: c,
                    user_id: u,
                    message_id: format!("m{o}"),
                    offset: o,
                    timestamp: o / 2,
                }
            )),
        ];
        let b = prop_oneof![
            dm().prop_map(S::DmNew),
            dm().prop_map(S::DmSent),
            presence().prop_map(S::PresenceChanged),
            (text(), text()).prop_map(|(c, u)| S::TypingUserStart(TypingEvent {
                channel_id: c,
                user_id: u
            })),
            (text(), text()).prop_map(|(c, u)| S::TypingUserStop(TypingEvent {
                channel_id: c,
                user_id: u
            })),
            (text(), text(), voice_state()).prop_map(|(c, u, s)| S::VoiceUserJoined(VoiceEvent {
                channel_id: c,
                user_id: u,
                state: Some(s)
            })),
            (text(), text()).prop_map(|(c, u)| S::VoiceUserLeft(VoiceEvent {
                channel_id: c,
                user_id: u,
                state: None
            })),
            (text(), text(), voice_state()).prop_map(|(c, u, s)| S::VoiceStateUpdate(VoiceEvent {
                channel_id: c,
                user_id: u,
                state: Some(s)
            })),
            (text(), text(), any::<bool>(), of(text())).prop_map(|(call_id, from, video, sdp)| {
                S::CallIncoming(CallIncoming {
                    call_id,
                    from_user_id: from,
                    call_type: if video {
                        CallType::Video
                    } else {
                        CallType::Audio
                    },
                    sdp,
                })
            }),
            call_event().prop_map(S::CallAnswered),
            call_event().prop_map(S::CallRejected),
            call_event().prop_map(S::CallEnded),
            call_event().prop_map(S::CallMissed),
            (text(), text(), json_value()).prop_map(|(call_id, from, candidate)| {
                S::CallIceCandidate(CallIceRelay {
                    call_id,
                    from_user_id: from,
                    candidate,
                })
            }),
            notification().prop_map(S::NotificationNew),
        ];
        let c = prop_oneof![
            moderation().prop_map(S::ModerationKicked),
            moderation().prop_map(S::ModerationBanned),
            moderation().prop_map(S::ModerationUserKicked),
            moderation().prop_map(S::ModerationUserBanned),
            any::<u64>().prop_map(|expires_at| S::AuthExpiring(AuthExpiring { expires_at })),
            (
                text(),
                any::<u64>(),
                text(),
                any::<u32>(),
                of(any::<bool>())
            )
                .prop_map(|(channel_id, offset, epoch, members, recovered)| {
                    S::ChannelJoined(JoinAck {
                        channel_id,
                        offset,
                        epoch,
                        members,
                        recovered,
                    })
                }),
            text().prop_map(|channel_id| S::ChannelLeft(ChannelRef { channel_id })),
            any::<u64>().prop_map(|expires_at| S::Ack(AckBody::Refresh(RefreshAck { expires_at }))),
            json_value().prop_map(|data| S::Ack(AckBody::Rpc(RpcAck { data }))),
        ];
        prop_oneof![a, b, c]
    }

    proptest! {
        #[test]
        fn client_json_and_binary_agree(id in of(any::<u64>()), event in client_event()) {
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
        fn server_json_and_binary_agree(id in of(any::<u64>()), event in server_event()) {
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

#[cfg(test)]
mod utf8_tests {
    use super::*;

    #[test]
    fn invalid_utf8_in_a_string_is_refused() {
        let msg = ClientMessage {
            id: Some(1),
            event: ClientEvent::MessageSend(MessageSend::new("general", "caf\u{e9} au lait")),
        };
        let mut bytes = encode_client(&msg);
        // Cut the two bytes of `é` in half: no longer UTF-8.
        let at = bytes
            .windows(2)
            .position(|w| w == [0xc3, 0xa9])
            .expect("the content is in the archive");
        bytes[at + 1] = b'!';
        let e = decode_client(&bytes).unwrap_err();
        assert!(
            e.message.contains("invalid binary envelope"),
            "{}",
            e.message
        );
    }
}
