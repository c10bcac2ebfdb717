//! Message assembly over a read buffer: frames in, messages out.
//!
//! [`Decoder::decode`] takes the connection's read buffer, consumes whole
//! frames from its front and returns at most one message per call.
//! `Ok(None)` means "need more bytes"; an error is a protocol violation to
//! answer with [`WsError::close_code`]. Payloads are unmasked in place and
//! handed out without copying (fragmented messages are copied once into the
//! message being assembled). Text is validated as each fragment arrives, so
//! invalid UTF-8 fails at the first bad fragment rather than at the end.

use bytes::{Buf, Bytes, BytesMut};

use super::close;
use super::frame::{parse_header, unmask, OpCode};
use super::WsError;

/// A complete message or control frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    /// Valid UTF-8, unmasked, mutable so that JSON can be parsed in place.
    Text(BytesMut),
    Binary(BytesMut),
    Ping(Bytes),
    Pong(Bytes),
    /// The peer's close code and reason, if it sent any.
    Close(Option<(u16, String)>),
}

struct Partial {
    opcode: OpCode,
    buf: BytesMut,
    /// How many bytes of `buf` are known to be valid UTF-8 (text only).
    validated: usize,
}

/// Assembles messages from frames. Eight bytes: a decoder lives as long as
/// its connection, so the message size limit is passed to each call
/// rather than kept.
#[derive(Default)]
pub struct Decoder {
    /// A fragmented message being assembled; boxed, as most connections
    /// never send one.
    partial: Option<Box<Partial>>,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Bytes held by a fragmented message being assembled.
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.buf.capacity())
    }

    /// The next complete message in `src`, if any; a message (all its
    /// fragments together) may be at most `max_message` bytes. Nothing is
    /// reserved for a frame's announced length: `src` grows only with the
    /// bytes that arrive.
    pub fn decode(
        &mut self,
        src: &mut BytesMut,
        max_message: usize,
    ) -> Result<Option<Message>, WsError> {
        loop {
            let Some(h) = parse_header(src)? else {
                return Ok(None);
            };
            let Some(mask) = h.mask else {
                return Err(WsError::Unmasked);
            };
            let in_progress = self.partial.as_ref().map_or(0, |p| p.buf.len() as u64);
            match h.opcode {
                OpCode::Continuation if self.partial.is_none() => {
                    return Err(WsError::UnexpectedContinuation)
                }
                OpCode::Text | OpCode::Binary if self.partial.is_some() => {
                    return Err(WsError::ExpectedContinuation)
                }
                _ => {}
            }
            if !h.opcode.is_control() && in_progress + h.payload_len > max_message as u64 {
                return Err(WsError::MessageTooBig { limit: max_message });
            }
            let total = h.header_len + h.payload_len as usize;
            if src.len() < total {
                // Memory follows the bytes that arrive: the announced
                // length is a promise, and nothing is set aside for it.
                return Ok(None);
            }
            let mut payload = src.split_to(total);
            payload.advance(h.header_len);
            unmask(&mut payload, mask);
            match h.opcode {
                OpCode::Ping => return Ok(Some(Message::Ping(payload.freeze()))),
                OpCode::Pong => return Ok(Some(Message::Pong(payload.freeze()))),
                OpCode::Close => return parse_close(&payload).map(|c| Some(Message::Close(c))),
                OpCode::Text | OpCode::Binary => {
                    let mut p = Partial {
                        opcode: h.opcode,
                        buf: payload,
                        validated: 0,
                    };
                    if h.opcode == OpCode::Text {
                        validate_utf8(&mut p, h.fin)?;
                    }
                    if h.fin {
                        return Ok(Some(finish(p)));
                    }
                    self.partial = Some(Box::new(p));
                }
                OpCode::Continuation => {
                    let p = self.partial.as_mut().expect("checked above");
                    p.buf.extend_from_slice(&payload);
                    if p.opcode == OpCode::Text {
                        validate_utf8(p, h.fin)?;
                    }
                    if h.fin {
                        let p = self.partial.take().expect("checked above");
                        return Ok(Some(finish(*p)));
                    }
                }
            }
        }
    }
}

fn finish(p: Partial) -> Message {
    match p.opcode {
        OpCode::Text => Message::Text(p.buf),
        _ => Message::Binary(p.buf),
    }
}

/// Validates the bytes added since the last call. An incomplete character
/// at the end is allowed until the final fragment.
fn validate_utf8(p: &mut Partial, fin: bool) -> Result<(), WsError> {
    match std::str::from_utf8(&p.buf[p.validated..]) {
        Ok(_) => {
            p.validated = p.buf.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !fin => {
            p.validated += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::BadClosePayload),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close::is_valid_wire_code(code) {
                return Err(WsError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some((code, reason.to_owned())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::encode_masked;
    use super::*;
    use proptest::prelude::*;

    const M: [u8; 4] = [0xA1, 0xB2, 0xC3, 0xD4];

    fn decode_all(bytes: &[u8], max: usize) -> Result<Vec<Message>, WsError> {
        let mut d = Decoder::new();
        let mut src = BytesMut::from(bytes);
        let mut out = vec![];
        while let Some(m) = d.decode(&mut src, max)? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn single_text() {
        let f = encode_masked(true, OpCode::Text, b"hello", M);
        assert_eq!(
            decode_all(&f, 1024).unwrap(),
            vec![Message::Text(BytesMut::from(&b"hello"[..]))]
        );
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut b = encode_masked(false, OpCode::Text, b"he", M);
        b.extend(encode_masked(true, OpCode::Ping, b"p", M));
        b.extend(encode_masked(false, OpCode::Continuation, b"ll", M));
        b.extend(encode_masked(true, OpCode::Continuation, b"o", M));
        let got = decode_all(&b, 1024).unwrap();
        assert_eq!(
            got,
            vec![
                Message::Ping(Bytes::from_static(b"p")),
                Message::Text(BytesMut::from(&b"hello"[..]))
            ]
        );
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let s = "€".as_bytes();
        let mut b = encode_masked(false, OpCode::Text, &s[..1], M);
        b.extend(encode_masked(true, OpCode::Continuation, &s[1..], M));
        assert_eq!(
            decode_all(&b, 1024).unwrap(),
            vec![Message::Text(BytesMut::from(s))]
        );
    }

    #[test]
    fn invalid_utf8_fails_at_the_bad_fragment() {
        let mut d = Decoder::new();
        let mut src = BytesMut::from(&encode_masked(false, OpCode::Text, b"ok", M)[..]);
        assert_eq!(d.decode(&mut src, 1024), Ok(None));
        src.extend_from_slice(&encode_masked(false, OpCode::Continuation, &[0xFF], M));
        assert_eq!(d.decode(&mut src, 1024), Err(WsError::InvalidUtf8));
        assert_eq!(WsError::InvalidUtf8.close_code(), 1007);
    }

    #[test]
    fn incomplete_char_at_end_of_message_is_invalid() {
        let f = encode_masked(true, OpCode::Text, &"€".as_bytes()[..2], M);
        assert_eq!(decode_all(&f, 1024), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn sequence_errors() {
        let c = encode_masked(true, OpCode::Continuation, b"x", M);
        assert_eq!(decode_all(&c, 1024), Err(WsError::UnexpectedContinuation));
        let mut b = encode_masked(false, OpCode::Text, b"x", M);
        b.extend(encode_masked(true, OpCode::Text, b"y", M));
        assert_eq!(decode_all(&b, 1024), Err(WsError::ExpectedContinuation));
        let mut unmasked = encode_masked(true, OpCode::Text, b"x", M);
        unmasked[1] &= 0x7F;
        unmasked.truncate(2);
        unmasked.push(b'x');
        assert_eq!(decode_all(&unmasked, 1024), Err(WsError::Unmasked));
    }

    #[test]
    fn too_big_is_detected_from_the_header() {
        let f = encode_masked(true, OpCode::Binary, &[0u8; 100], M);
        // Only the header has arrived: the limit is enforced before the payload.
        assert_eq!(
            decode_all(&f[..8], 99),
            Err(WsError::MessageTooBig { limit: 99 })
        );
        let mut b = encode_masked(false, OpCode::Binary, &[0u8; 60], M);
        b.extend(encode_masked(true, OpCode::Continuation, &[0u8; 60], M));
        assert_eq!(
            decode_all(&b, 100),
            Err(WsError::MessageTooBig { limit: 100 })
        );
        assert_eq!(WsError::MessageTooBig { limit: 1 }.close_code(), 1009);
    }

    #[test]
    fn an_announced_length_reserves_nothing() {
        // A header that announces 1 MiB, then a few bytes: the buffer holds
        // what arrived, not what was promised.
        let mut f = encode_masked(true, OpCode::Binary, &vec![7u8; 1 << 20], M);
        f.truncate(14 + 16);
        let mut d = Decoder::new();
        let mut src = BytesMut::with_capacity(64);
        src.extend_from_slice(&f);
        assert_eq!(d.decode(&mut src, 2 << 20), Ok(None));
        assert!(src.capacity() < 4096, "reserved {}", src.capacity());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn close_payloads() {
        let ok = encode_masked(true, OpCode::Close, &close::payload(1000, "bye"), M);
        assert_eq!(
            decode_all(&ok, 10).unwrap(),
            vec![Message::Close(Some((1000, "bye".into())))]
        );
        let empty = encode_masked(true, OpCode::Close, b"", M);
        assert_eq!(decode_all(&empty, 10).unwrap(), vec![Message::Close(None)]);
        let one = encode_masked(true, OpCode::Close, b"x", M);
        assert_eq!(decode_all(&one, 10), Err(WsError::BadClosePayload));
        let bad = encode_masked(true, OpCode::Close, &close::payload(1005, ""), M);
        assert_eq!(decode_all(&bad, 10), Err(WsError::InvalidCloseCode(1005)));
        let mut bad_utf8 = 1000u16.to_be_bytes().to_vec();
        bad_utf8.push(0xFF);
        let f = encode_masked(true, OpCode::Close, &bad_utf8, M);
        assert_eq!(decode_all(&f, 10), Err(WsError::InvalidUtf8));
    }

    proptest! {
        // Any message, cut into any fragments and fed in any chunking, comes
        // back whole and unchanged.
        #[test]
        fn fragment_and_chunk_round_trip(
            text in ".{0,200}",
            cuts in proptest::collection::vec(0usize..200, 0..5),
            chunk in 1usize..64,
            mask in any::<[u8; 4]>(),
        ) {
            let bytes = text.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            points.sort();
            points.dedup();
            let mut wire = Vec::new();
            let mut start = 0;
            let mut first = true;
            for &p in points.iter().chain(std::iter::once(&bytes.len())) {
                let fin = p == bytes.len();
                if p < start || (p == start && !fin) { continue; }
                let op = if first { OpCode::Text } else { OpCode::Continuation };
                wire.extend(encode_masked(fin, op, &bytes[start..p], mask));
                first = false;
                start = p;
                if fin { break; }
            }
            let mut d = Decoder::new();
            let mut src = BytesMut::new();
            let mut got = None;
            for piece in wire.chunks(chunk) {
                src.extend_from_slice(piece);
                if let Some(m) = d.decode(&mut src, 1 << 20).unwrap() {
                    got = Some(m);
                }
            }
            prop_assert_eq!(got, Some(Message::Text(BytesMut::from(bytes))));
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes, 256);
        }
    }
}
