//! Client-side framing, sans-IO: reading every complete server frame out of
//! a buffer without copying, and writing masked client frames.

use crate::ws::frame::{parse_header, unmask, write_header, MAX_SERVER_HEADER};
use crate::ws::{OpCode, WsError};

/// One complete message from the server: a data message (fragments already
/// joined) or a control frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    pub opcode: OpCode,
    pub payload: &'a [u8],
}

/// Accumulates bytes read from a server and yields complete messages.
///
/// Reads go straight into the reader's buffer ([`FrameReader::spare`] or
/// [`FrameReader::take_buf`]); [`FrameReader::next`] then returns each
/// complete message as a slice of that buffer, so a read holding many frames
/// costs one pass and no copy. Fragmented messages are joined into a side
/// buffer; their total size is bounded by `max_message`.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    pos: usize,
    max_message: usize,
    partial: Option<OpCode>,
    joined: Vec<u8>,
    done: Vec<u8>,
}

impl FrameReader {
    pub fn new(max_message: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            pos: 0,
            max_message,
            partial: None,
            joined: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Bytes received and not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Appends bytes read by any IO.
    pub fn extend(&mut self, data: &[u8]) {
        self.compact(data.len());
        self.buf.extend_from_slice(data);
    }

    /// Hands out the buffer for an owned-buffer read (io_uring): at least
    /// `min_spare` bytes are free after its length. Read into
    /// `buf.slice_mut(buf.len()..buf.capacity())`, then give the buffer back
    /// with [`FrameReader::put_buf`].
    pub fn take_buf(&mut self, min_spare: usize) -> Vec<u8> {
        self.compact(min_spare);
        std::mem::take(&mut self.buf)
    }

    /// Takes back the buffer from [`FrameReader::take_buf`], its length
    /// grown by what was read.
    pub fn put_buf(&mut self, buf: Vec<u8>) {
        self.buf = buf;
    }

    fn compact(&mut self, min_spare: usize) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.buf.capacity() - self.buf.len() < min_spare && self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(min_spare);
    }

    /// The next complete message, or `Ok(None)` when more bytes are needed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<RawFrame<'_>>, WsError> {
        loop {
            let avail = &self.buf[self.pos..];
            let Some(h) = parse_header(avail)? else {
                return Ok(None);
            };
            if h.mask.is_some() {
                return Err(WsError::MaskedFromServer);
            }
            let len = usize::try_from(h.payload_len).map_err(|_| WsError::BadLength)?;
            if len > self.max_message {
                return Err(WsError::MessageTooBig {
                    limit: self.max_message,
                });
            }
            let total = h.header_len + len;
            if avail.len() < total {
                return Ok(None);
            }
            let start = self.pos + h.header_len;
            self.pos += total;
            if h.opcode.is_control() {
                return Ok(Some(RawFrame {
                    opcode: h.opcode,
                    payload: &self.buf[start..start + len],
                }));
            }
            match (h.opcode, self.partial) {
                (OpCode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
                (OpCode::Continuation, Some(op)) => {
                    if self.joined.len() + len > self.max_message {
                        return Err(WsError::MessageTooBig {
                            limit: self.max_message,
                        });
                    }
                    self.joined.extend_from_slice(&self.buf[start..start + len]);
                    if h.fin {
                        self.partial = None;
                        self.done = std::mem::take(&mut self.joined);
                        return Ok(Some(RawFrame {
                            opcode: op,
                            payload: &self.done,
                        }));
                    }
                }
                (_, Some(_)) => return Err(WsError::ExpectedContinuation),
                (op, None) if h.fin => {
                    return Ok(Some(RawFrame {
                        opcode: op,
                        payload: &self.buf[start..start + len],
                    }))
                }
                (op, None) => {
                    self.partial = Some(op);
                    self.joined.clear();
                    self.joined.extend_from_slice(&self.buf[start..start + len]);
                }
            }
        }
    }
}

/// Masks client frames with keys from a fast generator seeded by the OS.
#[derive(Debug, Clone)]
pub struct Masker {
    state: u64,
}

impl Default for Masker {
    fn default() -> Self {
        Masker::new()
    }
}

impl Masker {
    pub fn new() -> Masker {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("the OS random source works");
        Masker {
            state: u64::from_ne_bytes(seed) | 1,
        }
    }

    fn key(&mut self) -> [u8; 4] {
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32).to_ne_bytes()
    }

    /// Appends one complete masked frame to `out` (so that many frames can
    /// go out in one write).
    pub fn append(&mut self, out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
        let mut head = [0u8; MAX_SERVER_HEADER];
        let n = write_header(&mut head, true, opcode, payload.len());
        out.extend_from_slice(&head[MAX_SERVER_HEADER - n..]);
        let at = out.len() - n + 1;
        out[at] |= 0x80;
        let key = self.key();
        out.extend_from_slice(&key);
        let start = out.len();
        out.extend_from_slice(payload);
        unmask(&mut out[start..], key);
    }

    /// One complete masked frame.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        self.append(&mut out, opcode, payload);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::encode;
    use proptest::prelude::*;

    fn collect(r: &mut FrameReader) -> Result<Vec<(OpCode, Vec<u8>)>, WsError> {
        let mut out = vec![];
        while let Some(f) = r.next()? {
            out.push((f.opcode, f.payload.to_vec()));
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_messages(
            sizes in proptest::collection::vec(0usize..70_000, 1..6),
            cut in 1usize..5000,
        ) {
            let mut wire = vec![];
            let mut want = vec![];
            for (i, n) in sizes.iter().enumerate() {
                let p: Vec<u8> = (0..*n).map(|j| (i + j) as u8).collect();
                wire.extend_from_slice(&encode(OpCode::Binary, &p));
                want.push((OpCode::Binary, p));
            }
            let mut r = FrameReader::new(1 << 20);
            let mut got = vec![];
            for chunk in wire.chunks(cut) {
                r.extend(chunk);
                got.extend(collect(&mut r).unwrap());
            }
            prop_assert_eq!(got, want);
            prop_assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn joins_fragments_around_control_frames() {
        let mut wire = vec![0x01, 3];
        wire.extend_from_slice(b"hel");
        wire.extend_from_slice(&[0x89, 1, b'p']);
        wire.extend_from_slice(&[0x80, 2]);
        wire.extend_from_slice(b"lo");
        let mut r = FrameReader::new(100);
        r.extend(&wire);
        assert_eq!(
            collect(&mut r).unwrap(),
            vec![
                (OpCode::Ping, b"p".to_vec()),
                (OpCode::Text, b"hello".to_vec())
            ]
        );
    }

    #[test]
    fn refuses_what_a_server_must_not_send() {
        let mut r = FrameReader::new(100);
        r.extend(&Masker::new().frame(OpCode::Text, b"x"));
        assert_eq!(r.next(), Err(WsError::MaskedFromServer));
        let mut r = FrameReader::new(4);
        r.extend(&encode(OpCode::Text, b"hello"));
        assert_eq!(r.next(), Err(WsError::MessageTooBig { limit: 4 }));
        let mut r = FrameReader::new(100);
        r.extend(&[0x80, 0]);
        assert_eq!(r.next(), Err(WsError::UnexpectedContinuation));
        let mut r = FrameReader::new(100);
        r.extend(&[0x01, 0, 0x01, 0]);
        assert_eq!(r.next(), Err(WsError::ExpectedContinuation));
    }

    #[test]
    fn masked_frames_decode_on_the_server() {
        let mut m = Masker::new();
        let mut out = vec![];
        m.append(&mut out, OpCode::Text, b"hello");
        m.append(&mut out, OpCode::Binary, &[9u8; 300]);
        let mut d = crate::ws::Decoder::new();
        let mut b = bytes::BytesMut::from(&out[..]);
        match d.decode(&mut b, 1 << 16).unwrap().unwrap() {
            crate::ws::Message::Text(t) => assert_eq!(&t[..], b"hello"),
            other => panic!("{other:?}"),
        }
        match d.decode(&mut b, 1 << 16).unwrap().unwrap() {
            crate::ws::Message::Binary(p) => assert_eq!(&p[..], &[9u8; 300][..]),
            other => panic!("{other:?}"),
        }
        // Keys differ from frame to frame.
        assert_ne!(m.frame(OpCode::Text, b"a"), m.frame(OpCode::Text, b"a"));
    }
}
