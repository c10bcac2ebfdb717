//! Voice channels: one per user, participants' state, LiveKit tokens.

use super::*;

#[test]
fn voice_keeps_one_channel_per_user_broadcasts_state_and_mints_tokens() {
    let lk = crate::livekit::LiveKit {
        url: "wss://livekit.example".into(),
        api_key: "APIkey".into(),
        api_secret: "a-livekit-secret-of-some-length".into(),
        token_ttl_s: 600,
    };
    let settings = Settings {
        livekit: Some(lk.clone()),
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let (v1, v2) = (channel_owned_by(1, 3), channel_owned_by(2, 3));
    let (a1, ra1) = sim.connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sim.connect(2, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(b, &v1);
    sim.join(b, &v2);
    rb.take();
    let join = |c: &str| {
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: c.into(),
        })
    };
    sim.send(a1, Some(1), join(&v1));
    let token = match ack_body(&ra1.take(), 1) {
        AckBody::Voice(v) => {
            assert_eq!(v.participants.len(), 1);
            assert_eq!(v.server_url.as_deref(), Some("wss://livekit.example"));
            v.token.expect("a token")
        }
        other => panic!("{other:?}"),
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&["APIkey"]);
    validation.validate_nbf = true;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(lk.api_secret.as_bytes()),
        &validation,
    );
    // The clock of the simulation is 1970; check the claims, not the time.
    let claims = match claims {
        Ok(c) => c.claims,
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
            let mut v = validation.clone();
            v.validate_exp = false;
            v.validate_nbf = false;
            jsonwebtoken::decode::<serde_json::Value>(
                &token,
                &jsonwebtoken::DecodingKey::from_secret(lk.api_secret.as_bytes()),
                &v,
            )
            .unwrap()
            .claims
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["video"]["room"], v1.as_str());
    assert_eq!(claims["video"]["roomJoin"], true);
    assert_eq!(claims["video"]["canPublish"], true);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(),
        600
    );
    assert_eq!(names(&rb.take()), ["voice:user_joined"]);
    // State changes are broadcast, no-ops are not.
    let mute = ClientEvent::VoiceUpdate(VoiceUpdate {
        muted: Some(true),
        ..VoiceUpdate::default()
    });
    sim.send(a1, Some(2), mute.clone());
    sim.send(a1, Some(3), mute);
    let states = picked(&rb.take(), |e| match e {
        ServerEvent::VoiceStateUpdate(v) => v.state.map(|s| s.muted),
        _ => None,
    });
    assert_eq!(states, vec![true]);
    // Alice joins another voice channel from her other device: she leaves the first.
    sim.send(a2, Some(4), join(&v2));
    let got = rb.take();
    let voice: Vec<(&str, String)> = got
        .iter()
        .filter_map(|m| match &m.event {
            ServerEvent::VoiceUserLeft(v) => Some(("left", v.channel_id.clone())),
            ServerEvent::VoiceUserJoined(v) => Some(("joined", v.channel_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(voice, [("left", v1.clone()), ("joined", v2.clone())]);
    ra2.take();
    sim.send(
        a1,
        Some(5),
        ClientEvent::VoiceUpdate(VoiceUpdate::default()),
    );
    assert_eq!(
        error_code(&ra1.take(), 5),
        ErrorCode::NotFound,
        "the first device is no longer in voice"
    );
    // Dropping the connection leaves voice.
    sim.close(a2);
    assert_eq!(names(&rb.take()), ["voice:user_left"]);
    sim.send(
        b,
        Some(6),
        ClientEvent::VoiceGetParticipants(ChannelRef {
            channel_id: v2.clone(),
        }),
    );
    assert!(
        matches!(ack_body(&rb.take(), 6), AckBody::Voice(v) if v.participants.is_empty() && v.token.is_none())
    );
}
