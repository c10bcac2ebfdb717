//! Calls, on the callee's home shard: ringing, answers, relayed signaling,
//! and how a call ends; the caller's side on the caller's home.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use std::sync::Arc;

use super::*;

/// Who asks a call for something, once found to be a party to it.
struct Party {
    id: u64,
    user: Arc<str>,
    from: Option<(ConnRef, Protocol)>,
    conn: Option<ConnRef>,
    ack: Option<u64>,
    is_caller: bool,
    is_callee: bool,
}

impl<O: Outbound> Engine<O> {
    /// `call:initiate`, on the callee's home: it rings there (in a cluster,
    /// on every node with a device of the callee), or is missed at once.
    fn call_create(&mut self, op: CallOp, now: u64, tx: &mut impl MeshTx) {
        let CallOp {
            call: id,
            user,
            from,
            ack,
            op:
                CallCmd::Create {
                    callee,
                    call_type,
                    sdp,
                    elsewhere,
                },
        } = op
        else {
            return;
        };
        let Some((conn, protocol)) = from else { return };
        let here = !self.devices(&callee).is_empty();
        if !here && elsewhere.is_none() && self.cluster_up() {
            // Connected to another node? Its presence in Redis says.
            let op = CallOp {
                call: id,
                user,
                from,
                ack,
                op: CallCmd::Create {
                    callee,
                    call_type,
                    sdp,
                    elsewhere,
                },
            };
            return self.send_bridge(ToBridge::CallReach(Box::new(op)), now, tx);
        }
        let call_id = call_id_str(id);
        self.answer(
            from,
            &ack_of(
                ack,
                AckBody::Call(CallAck {
                    call_id: call_id.clone(),
                }),
            ),
            now,
            tx,
        );
        if !here && elsewhere != Some(true) {
            let missed = ev(ServerEvent::CallMissed(CallEvent {
                call_id: call_id.clone(),
                user_id: callee.to_string(),
                reason: Some("offline".into()),
                sdp: None,
            }));
            self.send_to(conn, protocol, &missed, now, tx);
            self.missed_call_notice(&callee, &call_id, &user, call_type, now, tx);
            return self.send_user_op(user, None, None, UserCmd::CallDone { call: id }, now, tx);
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
        self.tell_callee(&callee, incoming, None, now, tx);
    }

    /// What a call is asked, on the shard holding it (the callee's home):
    /// each step has its handler, once the asker is found to be a party.
    pub(super) fn on_call_op(&mut self, op: CallOp, now: u64, tx: &mut impl MeshTx) {
        if matches!(op.op, CallCmd::Create { .. }) {
            return self.call_create(op, now, tx);
        }
        let CallOp {
            call: id,
            user,
            from,
            ack,
            op,
        } = op;
        if !self.calls.contains_key(&id) {
            let op = CallOp {
                call: id,
                user,
                from,
                ack,
                op,
            };
            return self.call_elsewhere(op, now, tx);
        }
        let call = self.calls.get_mut(&id).expect("checked above");
        let conn = from.map(|f| f.0);
        let is_caller = user == call.caller && conn == Some(call.caller_conn);
        let is_callee = user == call.callee;
        if !is_caller && !is_callee {
            if matches!(op, CallCmd::PartyGone) {
                return;
            }
            let e = err(ack, ErrorCode::Forbidden, "not a party to this call");
            return self.answer(from, &e, now, tx);
        }
        let p = Party {
            id,
            user,
            from,
            conn,
            ack,
            is_caller,
            is_callee,
        };
        match op {
            CallCmd::Create { .. } => {}
            CallCmd::Answer { sdp } => self.call_answer(p, sdp, now, tx),
            CallCmd::Reject { reason } => self.call_reject(p, reason, now, tx),
            CallCmd::End => self.call_end(p, now, tx),
            CallCmd::Ice(candidate) => self.call_ice(p, candidate, now, tx),
            CallCmd::PartyGone => self.call_party_gone(p, now, tx),
        }
    }

    /// `call:answer` by the callee, on one of its devices: the caller hears it, the
    /// callee's other devices stop ringing.
    fn call_answer(&mut self, p: Party, sdp: Option<String>, now: u64, tx: &mut impl MeshTx) {
        let Party {
            id,
            from,
            ack,
            is_callee,
            ..
        } = p;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let (Some(from), None, true) = (from, call.answered, is_callee) else {
            return self.answer(from, &not_ringing(ack), now, tx);
        };
        call.answered = Some(from);
        let (caller_conn, caller_protocol, callee) =
            (call.caller_conn, call.caller_protocol, call.callee.clone());
        let answered = ev(ServerEvent::CallAnswered(call_event(
            id, &callee, None, sdp,
        )));
        self.send_to(caller_conn, caller_protocol, &answered, now, tx);
        let elsewhere =
            ServerEvent::CallEnded(call_event(id, &callee, Some("answered_elsewhere"), None));
        self.tell_callee(&callee, elsewhere, Some(from.0), now, tx);
        self.answer(Some(from), &empty_ack(ack), now, tx);
    }

    /// `call:reject` by the callee: the call ends for everyone.
    fn call_reject(&mut self, p: Party, reason: Option<String>, now: u64, tx: &mut impl MeshTx) {
        let Party {
            id,
            from,
            conn,
            ack,
            is_callee,
            ..
        } = p;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if call.answered.is_some() || !is_callee {
            return self.answer(from, &not_ringing(ack), now, tx);
        }
        let (caller_conn, caller_protocol, callee, caller) = (
            call.caller_conn,
            call.caller_protocol,
            call.callee.clone(),
            call.caller.clone(),
        );
        self.calls.remove(&id);
        let rejected = ev(ServerEvent::CallRejected(call_event(
            id,
            &callee,
            reason.as_deref(),
            None,
        )));
        self.send_to(caller_conn, caller_protocol, &rejected, now, tx);
        let ended = ServerEvent::CallEnded(call_event(id, &callee, Some("rejected"), None));
        self.tell_callee(&callee, ended, conn, now, tx);
        self.answer(from, &empty_ack(ack), now, tx);
        self.send_user_op(caller, None, None, UserCmd::CallDone { call: id }, now, tx);
    }

    /// `call:end` by either party (a cancel while it rings, a hang-up after).
    fn call_end(&mut self, p: Party, now: u64, tx: &mut impl MeshTx) {
        let Party {
            id,
            user,
            from,
            conn,
            ack,
            is_caller,
            is_callee,
        } = p;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        if is_callee && !is_caller && call.answered.is_some_and(|(a, _)| Some(a) != conn) {
            return self.answer(
                from,
                &err(ack, ErrorCode::BadRequest, "answered on another device"),
                now,
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
        self.answer(from, &empty_ack(ack), now, tx);
        self.end_call(id, reason, &user, now, tx);
    }

    /// `call:ice_candidate`: relayed to the other party (while it rings, to
    /// every device of the callee).
    fn call_ice(&mut self, p: Party, candidate: Json, now: u64, tx: &mut impl MeshTx) {
        let Party {
            id,
            user,
            from,
            conn,
            ack,
            is_caller,
            ..
        } = p;
        let call_id = call_id_str(id);
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let (answered, callee) = (call.answered, call.callee.clone());
        let (caller_conn, caller_protocol) = (call.caller_conn, call.caller_protocol);
        let relay = ServerEvent::CallIceCandidate(CallIceRelay {
            call_id: call_id.clone(),
            from_user_id: user.to_string(),
            candidate,
        });
        if is_caller {
            match answered {
                Some((c, p)) => self.send_to(c, p, &ev(relay), now, tx),
                None => self.tell_callee(&callee, relay, None, now, tx),
            }
        } else {
            if answered.is_some_and(|(a, _)| Some(a) != conn) {
                return self.answer(
                    from,
                    &err(ack, ErrorCode::BadRequest, "answered on another device"),
                    now,
                    tx,
                );
            }
            self.send_to(caller_conn, caller_protocol, &ev(relay), now, tx);
        }
        self.answer(from, &empty_ack(ack), now, tx);
    }

    /// The caller's connection, or the callee's that answered, is gone: the
    /// call ends.
    fn call_party_gone(&mut self, p: Party, now: u64, tx: &mut impl MeshTx) {
        let Party {
            id,
            user,
            conn,
            is_caller,
            is_callee,
            ..
        } = p;
        let Some(call) = self.calls.get_mut(&id) else {
            return;
        };
        let answered_by = call.answered.is_some_and(|(a, _)| Some(a) == conn);
        if is_caller || (is_callee && answered_by) {
            self.end_call(id, "disconnected", &user, now, tx);
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
        let ended = ServerEvent::CallEnded(CallEvent {
            call_id: call_id_str(id),
            user_id: by.to_string(),
            reason: Some(reason.into()),
            sdp: None,
        });
        if *by == call.caller {
            match call.answered {
                Some((c, p)) => self.send_to(c, p, &ev(ended), now, tx),
                None => self.tell_callee(&call.callee, ended, None, now, tx),
            }
        } else {
            let msg = ev(ended.clone());
            self.send_to(call.caller_conn, call.caller_protocol, &msg, now, tx);
            // The callee's other devices stop ringing too.
            if call.answered.is_none() {
                self.tell_callee(&call.callee, ended, None, now, tx);
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
        self.tell_callee(&call.callee, ended, None, now, tx);
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

    /// A call event for every device of the callee: here, and in a cluster
    /// on the other nodes (but `except`, here or, through the bridge,
    /// there).
    fn tell_callee(
        &mut self,
        callee: &Arc<str>,
        event: ServerEvent,
        except: Option<ConnRef>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.cluster_up() {
            let msg = ToBridge::ToUser {
                user: callee.clone(),
                msg: ev(event.clone()),
                except: except.filter(|c| c.shard as usize >= self.shards as usize),
            };
            self.send_bridge(msg, now, tx);
        }
        self.send_devices(callee, event, except, now, tx);
    }

    /// A call operation for a call this shard does not hold. In a cluster,
    /// the user's home on this node knows the calls of other nodes that
    /// ring the user here, and passes the operation to the node holding
    /// it; otherwise the call is unknown.
    fn call_elsewhere(&mut self, op: CallOp, now: u64, tx: &mut impl MeshTx) {
        let local = op
            .from
            .is_some_and(|(c, _)| (c.shard as usize) < self.shards as usize);
        if self.cluster_up() && local {
            let home = home_of(&op.user, self.shards);
            if home != self.shard {
                return self.route(home, MeshMsg::CallOp(Box::new(op)), now, tx);
            }
            let answer = matches!(op.op, CallCmd::Answer { .. });
            let conn = op.from.map(|(c, _)| c);
            let node = self
                .users
                .get_mut(&op.user)
                .and_then(|st| st.extra_mut())
                .and_then(|m| m.remote_calls.iter_mut().find(|r| r.call == op.call))
                .map(|r| {
                    if answer {
                        r.answered_by = conn;
                    }
                    r.node
                });
            if let Some(node) = node {
                let op = Box::new(op);
                return self.send_bridge(ToBridge::CallTo { node, op }, now, tx);
            }
        }
        if !matches!(op.op, CallCmd::PartyGone) {
            let e = format!("no call `{}`", call_id_str(op.call));
            self.answer(op.from, &err(op.ack, ErrorCode::NotFound, e), now, tx);
        }
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
        let _ = self.notify(
            callee,
            "missed_call".into(),
            Some(Json(data.to_string())),
            Some(caller.clone()),
            now,
            tx,
        );
    }

    /// `call:initiate`, on the caller's home: the call is numbered and
    /// created on the callee's home.
    pub(super) fn call_initiate(
        &mut self,
        r: UserReq,
        c: CallInitiate,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
        let Some((conn, protocol)) = from else { return };
        let callee: Arc<str> = c.to_user_id.as_str().into();
        let owner = home_of(&callee, self.shards);
        let n = self.next_id() & 0xffff_ffff;
        let call = ((owner as u64) << 48) | ((self.shard as u64) << 32) | n;
        self.user(&user).more().calls.push((call, conn));
        let op = CallOp {
            call,
            user,
            from: Some((conn, protocol)),
            ack,
            op: CallCmd::Create {
                callee,
                call_type: c.call_type,
                sdp: c.sdp,
                elsewhere: None,
            },
        };
        self.route(owner, MeshMsg::CallOp(Box::new(op)), now, tx);
    }

    /// A call this user placed is over.
    pub(super) fn call_done_home(&mut self, user: &Arc<str>, call: u64) {
        if let Some(st) = self.users.get_mut(user) {
            st.more().calls.retain(|(id, _)| *id != call);
        }
    }

    /// A device of `user` is gone: the calls it placed hear that their
    /// party is gone, and those it answered end, here or on other nodes.
    pub(super) fn calls_of_gone_device(
        &mut self,
        user: &Arc<str>,
        conn: ConnRef,
        protocol: Protocol,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let placed: Vec<u64> = self
            .users
            .get_mut(user)
            .and_then(|st| st.extra_mut())
            .map(|m| {
                let placed = m
                    .calls
                    .iter()
                    .filter(|(_, c)| *c == conn)
                    .map(|(id, _)| *id)
                    .collect();
                m.calls.retain(|(_, c)| *c != conn);
                placed
            })
            .unwrap_or_default();
        // A gone party's operation on a call, from this connection.
        let gone = |call| {
            Box::new(CallOp {
                call,
                user: user.clone(),
                from: Some((conn, protocol)),
                ack: None,
                op: CallCmd::PartyGone,
            })
        };
        for call in placed {
            let op = MeshMsg::CallOp(gone(call));
            self.route((call >> 48) as ShardId, op, now, tx);
        }
        // Calls this device answered end with it.
        let answered: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.callee == *user && c.answered.is_some_and(|(a, _)| a == conn))
            .map(|(id, _)| *id)
            .collect();
        for call in answered {
            self.end_call(call, "disconnected", user, now, tx);
        }
        // And calls of other nodes it answered.
        let remote: Vec<(u64, u64)> = self
            .users
            .get_mut(user)
            .and_then(|st| st.extra_mut())
            .map(|m| {
                let gone = m
                    .remote_calls
                    .iter()
                    .filter(|r| r.answered_by == Some(conn))
                    .map(|r| (r.call, r.node))
                    .collect();
                m.remote_calls.retain(|r| r.answered_by != Some(conn));
                gone
            })
            .unwrap_or_default();
        for (call, node) in remote {
            let op = gone(call);
            self.send_bridge(ToBridge::CallTo { node, op }, now, tx);
        }
    }

    /// `call:initiate`: checked here, then to the caller's home.
    pub(super) fn on_call_initiate(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: CallInitiate,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let from = Some((self.here(id), member.protocol));
        if let Err((code, e)) = self.check_user_target(id, "toUserId", &c.to_user_id) {
            return self.error(id, ack, code, e);
        }
        if *c.to_user_id == *member.user {
            return self.error(id, ack, ErrorCode::BadRequest, "cannot call yourself");
        }
        if c.sdp.as_ref().is_some_and(|s| s.len() > MAX_SDP_BYTES) {
            return self.error(
                id,
                ack,
                ErrorCode::TooLarge,
                format!("`sdp` is longer than {MAX_SDP_BYTES} bytes"),
            );
        }
        self.send_user_op(member.user, from, ack, UserCmd::CallInitiate(c), now, tx)
    }

    /// `call:answer`: checked here, then to the shard holding the call.
    pub(super) fn on_call_answer(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: CallAnswer,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if c.sdp.as_ref().is_some_and(|s| s.len() > MAX_SDP_BYTES) {
            return self.error(
                id,
                ack,
                ErrorCode::TooLarge,
                format!("`sdp` is longer than {MAX_SDP_BYTES} bytes"),
            );
        }
        self.call_op(id, ack, &c.call_id, CallCmd::Answer { sdp: c.sdp }, now, tx)
    }

    /// `call:reject`, to the shard holding the call.
    pub(super) fn on_call_reject(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: CallReject,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.call_op(
            id,
            ack,
            &c.call_id,
            CallCmd::Reject { reason: c.reason },
            now,
            tx,
        )
    }

    /// `call:end`, to the shard holding the call.
    pub(super) fn on_call_end(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: CallRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.call_op(id, ack, &c.call_id, CallCmd::End, now, tx)
    }

    /// `call:ice_candidate`: checked here, then to the shard holding the call.
    pub(super) fn on_call_ice_candidate(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: CallIce,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if c.candidate.0.len() > MAX_SDP_BYTES {
            return self.error(id, ack, ErrorCode::TooLarge, "`candidate` is too large");
        }
        self.call_op(id, ack, &c.call_id, CallCmd::Ice(c.candidate), now, tx)
    }

    /// Whether a callee is connected to another node: the call rings or is
    /// missed.
    pub(super) fn on_call_reach(
        &mut self,
        mut op: CallOp,
        answer: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let CallCmd::Create { elsewhere, .. } = &mut op.op {
            *elsewhere = Some(answer);
        }
        self.on_call_op(op, now, tx);
    }

    /// A call's operation that no node holds.
    pub(super) fn on_call_gone(&mut self, op: CallOp, now: u64, tx: &mut impl MeshTx) {
        if !matches!(op.op, CallCmd::PartyGone) {
            let e = format!("no call `{}`", call_id_str(op.call));
            self.answer(op.from, &err(op.ack, ErrorCode::NotFound, e), now, tx);
        }
    }
}

/// A call's event about `who`.
fn call_event(id: u64, who: &Arc<str>, reason: Option<&str>, sdp: Option<String>) -> CallEvent {
    CallEvent {
        call_id: call_id_str(id),
        user_id: who.to_string(),
        reason: reason.map(Into::into),
        sdp,
    }
}

fn not_ringing(ack: Option<u64>) -> ServerMessage {
    err(
        ack,
        ErrorCode::BadRequest,
        "the call is not ringing for you",
    )
}
