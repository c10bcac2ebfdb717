//! Calls, on the callee's home shard: ringing, answers, relayed signaling,
//! and how a call ends.

use std::sync::Arc;

use super::*;

impl<O: Outbound> Engine<O> {
    pub(super) fn on_call_op(&mut self, op: CallOp, now: u64, tx: &mut impl MeshTx) {
        let CallOp {
            call: id,
            user,
            from,
            ack,
            op,
        } = op;
        let reply = |e: &mut Self, msg: ServerMessage, tx: &mut _| e.answer(from, &msg, now, tx);
        if let CallCmd::Create {
            callee,
            call_type,
            sdp,
        } = op
        {
            let Some((conn, protocol)) = from else { return };
            let call_id = call_id_str(id);
            reply(
                self,
                ack_of(
                    ack,
                    AckBody::Call(CallAck {
                        call_id: call_id.clone(),
                    }),
                ),
                tx,
            );
            if self.devices(&callee).is_empty() {
                let missed = ev(ServerEvent::CallMissed(CallEvent {
                    call_id: call_id.clone(),
                    user_id: callee.to_string(),
                    reason: Some("offline".into()),
                    sdp: None,
                }));
                self.send_to(conn, protocol, &missed, now, tx);
                self.missed_call_notice(&callee, &call_id, &user, call_type, now, tx);
                return self.send_user_op(
                    user,
                    None,
                    None,
                    UserCmd::CallDone { call: id },
                    now,
                    tx,
                );
            }
            let ring_until = now + self.s.call_ring_timeout_ms;
            self.calls.insert(
                id,
                Call {
                    caller: user.clone(),
                    caller_conn: conn,
                    caller_protocol: protocol,
                    callee: callee.clone(),
                    call_type,
                    answered: None,
                    ring_until,
                },
            );
            self.timers.at(ring_until, Timer::CallRing { call: id });
            let incoming = ServerEvent::CallIncoming(CallIncoming {
                call_id,
                from_user_id: user.to_string(),
                call_type,
                sdp,
            });
            return self.send_devices(&callee, incoming, None, now, tx);
        }
        let Some(call) = self.calls.get_mut(&id) else {
            return reply(
                self,
                err(
                    ack,
                    ErrorCode::NotFound,
                    format!("no call `{}`", call_id_str(id)),
                ),
                tx,
            );
        };
        let conn = from.map(|f| f.0);
        let is_caller = user == call.caller && conn == Some(call.caller_conn);
        let is_callee = user == call.callee;
        if !is_caller && !is_callee {
            if matches!(op, CallCmd::PartyGone) {
                return;
            }
            return reply(
                self,
                err(ack, ErrorCode::Forbidden, "not a party to this call"),
                tx,
            );
        }
        let call_id = call_id_str(id);
        let call_event = |who: &Arc<str>, reason: Option<&str>, sdp: Option<String>| CallEvent {
            call_id: call_id.clone(),
            user_id: who.to_string(),
            reason: reason.map(Into::into),
            sdp,
        };
        let not_ringing = || {
            err(
                ack,
                ErrorCode::BadRequest,
                "the call is not ringing for you",
            )
        };
        match op {
            CallCmd::Create { .. } => unreachable!("handled above"),
            CallCmd::Answer { sdp } => {
                let (Some(from), None, true) = (from, call.answered, is_callee) else {
                    return reply(self, not_ringing(), tx);
                };
                call.answered = Some(from);
                let (caller_conn, caller_protocol, callee) =
                    (call.caller_conn, call.caller_protocol, call.callee.clone());
                let answered = ev(ServerEvent::CallAnswered(call_event(&callee, None, sdp)));
                self.send_to(caller_conn, caller_protocol, &answered, now, tx);
                let elsewhere =
                    ServerEvent::CallEnded(call_event(&callee, Some("answered_elsewhere"), None));
                self.send_devices(&callee, elsewhere, Some(from.0), now, tx);
                reply(self, empty_ack(ack), tx);
            }
            CallCmd::Reject { reason } => {
                if call.answered.is_some() || !is_callee {
                    return reply(self, not_ringing(), tx);
                }
                let (caller_conn, caller_protocol, callee, caller) = (
                    call.caller_conn,
                    call.caller_protocol,
                    call.callee.clone(),
                    call.caller.clone(),
                );
                self.calls.remove(&id);
                let rejected = ev(ServerEvent::CallRejected(call_event(
                    &callee,
                    reason.as_deref(),
                    None,
                )));
                self.send_to(caller_conn, caller_protocol, &rejected, now, tx);
                let ended = ServerEvent::CallEnded(call_event(&callee, Some("rejected"), None));
                self.send_devices(&callee, ended, conn, now, tx);
                reply(self, empty_ack(ack), tx);
                self.send_user_op(caller, None, None, UserCmd::CallDone { call: id }, now, tx);
            }
            CallCmd::End => {
                if is_callee && !is_caller && call.answered.is_some_and(|(a, _)| Some(a) != conn) {
                    return reply(
                        self,
                        err(ack, ErrorCode::BadRequest, "answered on another device"),
                        tx,
                    );
                }
                let reason = if call.answered.is_none() && is_caller {
                    "cancelled"
                } else if call.answered.is_none() {
                    "rejected"
                } else {
                    "ended"
                };
                reply(self, empty_ack(ack), tx);
                self.end_call(id, reason, &user, now, tx);
            }
            CallCmd::Ice(candidate) => {
                let (answered, callee) = (call.answered, call.callee.clone());
                let (caller_conn, caller_protocol) = (call.caller_conn, call.caller_protocol);
                let relay = ev(ServerEvent::CallIceCandidate(CallIceRelay {
                    call_id: call_id.clone(),
                    from_user_id: user.to_string(),
                    candidate,
                }));
                if is_caller {
                    match answered {
                        Some((c, p)) => self.send_to(c, p, &relay, now, tx),
                        None => {
                            let targets = self.devices(&callee);
                            self.send_to_all(&targets, &relay, now, tx);
                        }
                    }
                } else {
                    if answered.is_some_and(|(a, _)| Some(a) != conn) {
                        return reply(
                            self,
                            err(ack, ErrorCode::BadRequest, "answered on another device"),
                            tx,
                        );
                    }
                    self.send_to(caller_conn, caller_protocol, &relay, now, tx);
                }
                reply(self, empty_ack(ack), tx);
            }
            CallCmd::PartyGone => {
                if is_caller {
                    self.end_call(id, "disconnected", &user, now, tx);
                }
            }
        }
    }

    /// Ends a call: the other side hears why; the caller's home forgets it.
    pub(super) fn end_call(
        &mut self,
        id: u64,
        reason: &str,
        by: &Arc<str>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        let ended = ev(ServerEvent::CallEnded(CallEvent {
            call_id: call_id_str(id),
            user_id: by.to_string(),
            reason: Some(reason.into()),
            sdp: None,
        }));
        if *by == call.caller {
            match call.answered {
                Some((c, p)) => self.send_to(c, p, &ended, now, tx),
                None => {
                    let targets = self.devices(&call.callee);
                    self.send_to_all(&targets, &ended, now, tx);
                }
            }
        } else {
            self.send_to(call.caller_conn, call.caller_protocol, &ended, now, tx);
            // The callee's other devices stop ringing too.
            if call.answered.is_none() {
                let targets = self.devices(&call.callee);
                self.send_to_all(&targets, &ended, now, tx);
            }
        }
        self.send_user_op(
            call.caller,
            None,
            None,
            UserCmd::CallDone { call: id },
            now,
            tx,
        );
    }

    pub(super) fn ring_out(&mut self, id: u64, now: u64, tx: &mut impl MeshTx) {
        let Some(call) = self.calls.get(&id) else {
            return;
        };
        if call.answered.is_some() || call.ring_until > now {
            return;
        }
        let call = self.calls.remove(&id).expect("present above");
        let call_id = call_id_str(id);
        let missed = ev(ServerEvent::CallMissed(CallEvent {
            call_id: call_id.clone(),
            user_id: call.callee.to_string(),
            reason: Some("no_answer".into()),
            sdp: None,
        }));
        self.send_to(call.caller_conn, call.caller_protocol, &missed, now, tx);
        let ended = ServerEvent::CallEnded(CallEvent {
            call_id: call_id.clone(),
            user_id: call.callee.to_string(),
            reason: Some("missed".into()),
            sdp: None,
        });
        self.send_devices(&call.callee, ended, None, now, tx);
        self.missed_call_notice(
            &call.callee,
            &call_id,
            &call.caller,
            call.call_type,
            now,
            tx,
        );
        self.send_user_op(
            call.caller,
            None,
            None,
            UserCmd::CallDone { call: id },
            now,
            tx,
        );
    }

    pub(super) fn missed_call_notice(
        &mut self,
        callee: &Arc<str>,
        call_id: &str,
        caller: &Arc<str>,
        call_type: CallType,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let data = serde_json::json!({
            "callId": call_id,
            "fromUserId": &**caller,
            "callType": call_type.as_str(),
        });
        self.notify(
            callee,
            "missed_call".into(),
            Some(Json(data.to_string())),
            now,
            tx,
        );
    }
}
