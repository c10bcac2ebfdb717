#![no_main]
//! The JSON envelope parser (simd-json, in place): never panics; whatever
//! it accepts survives a re-encode and parse unchanged.

use corecast::protocol::json::{decode_client, encode_client, Scratch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut scratch = Scratch::default();
    let mut buf = data.to_vec();
    if let Ok(msg) = decode_client(&mut buf, &mut scratch) {
        let mut out = Vec::new();
        encode_client(&msg, &mut out);
        let again = decode_client(&mut out, &mut scratch).expect("re-encoded envelope parses");
        assert_eq!(again, msg);
    }
});
