#![no_main]
//! The upgrade request parser: any bytes give a request, "need more", or a
//! typed refusal whose response is well-formed.

use corecast::ws::handshake::{accept_response, parse_request, HandshakeConfig, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = HandshakeConfig {
        allowed_origins: vec!["https://a.example".into()],
        max_header_bytes: 4096,
    };
    match parse_request(data, &cfg) {
        Ok(Some((req, used))) => {
            assert!(used <= data.len());
            if let Request::Upgrade(up) = req {
                assert!(accept_response(&up).starts_with(b"HTTP/1.1 101 "));
            }
        }
        Ok(None) => assert!(data.len() <= cfg.max_header_bytes),
        Err(e) => assert!(e.response().starts_with(b"HTTP/1.1 ")),
    }
});
