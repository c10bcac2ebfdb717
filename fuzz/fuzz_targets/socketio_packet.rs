#![no_main]
//! The Socket.IO side: Engine.IO packets, Socket.IO packet headers, an
//! EVENT read as a request, a CONNECT's auth payload, and the same bytes
//! as a socket.io-msgpack-parser packet. Never panics; an EVENT that
//! decodes is the same request as its native JSON envelope; a MessagePack
//! packet that translates comes back the same from its text form.

use corecast::protocol::json::{self, Scratch};
use corecast::protocol::msgpack;
use corecast::protocol::socketio::{connect_auth, engine_packet, envelope, packet, EnginePacket};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = msgpack::packet_to_text(data) {
        if packet(&text).is_ok() {
            let mut again = Vec::new();
            msgpack::packet_from_text(&text, &mut again).expect("a read packet translates back");
            assert_eq!(msgpack::packet_to_text(&again).expect("its own output reads"), text);
        }
    }
    let Ok(EnginePacket::Message(sio)) = engine_packet(data) else {
        return;
    };
    let Ok(p) = packet(sio) else {
        return;
    };
    if let Ok(a) = connect_auth(p.data) {
        if let Some(o) = a.offset {
            let _ = corecast::protocol::socketio::recovery_offset(&o);
        }
    }
    let mut scratch = Scratch::default();
    let mut buf = sio.to_vec();
    let Ok(env) = envelope(&mut buf, &mut scratch) else {
        return;
    };
    if let Ok(msg) = env.decode() {
        let mut native = Vec::new();
        json::encode_client(&msg, &mut native);
        let again = json::decode_client(&mut native, &mut scratch).expect("the native envelope parses");
        // Opaque JSON (ICE candidates) may come back in another key order.
        if !matches!(msg.event, corecast::protocol::ClientEvent::CallIceCandidate(_)) {
            assert_eq!(again, msg);
        }
    }
});
