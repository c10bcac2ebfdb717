#![no_main]
//! The JSON envelope parser (simd-json, in place): never panics; whatever
//! it accepts survives a re-encode and parse unchanged. An opaque JSON
//! value (an ICE candidate) keeps its meaning, not its key order: an
//! object of more than 32 keys comes back in the order of a hash map.

use corecast::protocol::json::{decode_client, encode_client, Scratch};
use corecast::protocol::{ClientEvent, ClientMessage};
use libfuzzer_sys::fuzz_target;

fn same(a: &ClientMessage, b: &ClientMessage) -> bool {
    let value = |j: &str| serde_json::from_str::<serde_json::Value>(j).expect("valid JSON");
    match (&a.event, &b.event) {
        (ClientEvent::CallIceCandidate(x), ClientEvent::CallIceCandidate(y)) => {
            a.id == b.id && x.call_id == y.call_id && value(&x.candidate.0) == value(&y.candidate.0)
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut scratch = Scratch::default();
    let mut buf = data.to_vec();
    if let Ok(msg) = decode_client(&mut buf, &mut scratch) {
        let mut out = Vec::new();
        encode_client(&msg, &mut out);
        let again = decode_client(&mut out, &mut scratch).expect("re-encoded envelope parses");
        assert!(same(&again, &msg), "{again:?} != {msg:?}");
    }
});
