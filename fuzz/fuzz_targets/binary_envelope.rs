#![no_main]
//! The binary envelope (rkyv, validated before access): never panics on
//! arbitrary bytes; whatever it accepts round-trips.

use corecast::protocol::binary::{decode_client, encode_client, peek_client_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode_client(data) {
        assert_eq!(peek_client_id(data), msg.id);
        let again = decode_client(&encode_client(&msg)).expect("re-encoded archive validates");
        assert_eq!(again, msg);
    }
});
