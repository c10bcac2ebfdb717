#![no_main]
//! The frame decoder fed arbitrary bytes in arbitrary chunks: it never
//! panics, never returns invalid UTF-8 as text, and respects its limit.

use bytes::BytesMut;
use corecast::ws::{Decoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else { return };
    let chunk = (chunk as usize % 64) + 1;
    let mut d = Decoder::new();
    let mut src = BytesMut::new();
    for piece in rest.chunks(chunk) {
        src.extend_from_slice(piece);
        loop {
            match d.decode(&mut src, 4096) {
                Ok(Some(Message::Text(t))) => {
                    assert!(std::str::from_utf8(&t).is_ok());
                    assert!(t.len() <= 4096);
                }
                Ok(Some(Message::Binary(b))) => assert!(b.len() <= 4096),
                Ok(Some(Message::Close(Some((code, _))))) => assert!(corecast::ws::close::is_valid_wire_code(code)),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                    return;
                }
            }
        }
    }
});
