//! Frame headers, masking and server frame encoding (RFC 6455 §5.2).
//!
//! Server frames are never masked, so one encoded frame (header and payload
//! in one buffer) serves every recipient: [`FrameBuf`] writes the payload
//! first into space that leaves room for the largest header, then writes the
//! header in front of it, so a frame costs one allocation and no copy.

use bytes::Bytes;

use super::WsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl OpCode {
    pub fn from_u8(v: u8) -> Result<OpCode, WsError> {
        Ok(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(WsError::ReservedOpcode(other)),
        })
    }

    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes taken by the header itself (2 to 14).
    pub header_len: usize,
}

/// The largest header a server writes (no mask): 2 + 8 bytes.
pub const MAX_SERVER_HEADER: usize = 10;

/// Parses a frame header from the start of `buf`. `Ok(None)` means more
/// bytes are needed; rule violations that the header alone shows are errors.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(WsError::RsvSet);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = OpCode::from_u8(b0 & 0x0F)?;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControl);
        }
        if len7 > 125 {
            return Err(WsError::ControlTooLong);
        }
    }
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(WsError::BadLength);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let mut m = [0u8; 4];
        m.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// XORs `buf` with the 4-byte `mask`, starting at mask offset 0. Works a
/// machine word at a time; the compiler vectorises the loop.
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask) as u64;
    let word = word | (word << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let v = u64::from_ne_bytes(b) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Writes a server (unmasked) frame header for `len` bytes into the end of
/// `dst` and returns how many bytes it used (2, 4 or 10).
pub fn write_header(
    dst: &mut [u8; MAX_SERVER_HEADER],
    fin: bool,
    opcode: OpCode,
    len: usize,
) -> usize {
    let b0 = (if fin { 0x80 } else { 0 }) | opcode as u8;
    let (n, bytes): (usize, [u8; MAX_SERVER_HEADER]) = if len < 126 {
        let mut b = [0u8; MAX_SERVER_HEADER];
        b[8] = b0;
        b[9] = len as u8;
        (2, b)
    } else if len <= u16::MAX as usize {
        let mut b = [0u8; MAX_SERVER_HEADER];
        b[6] = b0;
        b[7] = 126;
        b[8..10].copy_from_slice(&(len as u16).to_be_bytes());
        (4, b)
    } else {
        let mut b = [0u8; MAX_SERVER_HEADER];
        b[0] = b0;
        b[1] = 127;
        b[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (10, b)
    };
    dst.copy_from_slice(&bytes);
    n
}

/// A server frame under construction: write the payload into [`FrameBuf::payload`],
/// then [`FrameBuf::finish`] puts the header in front without moving the payload.
pub struct FrameBuf {
    buf: Vec<u8>,
}

impl FrameBuf {
    pub fn with_capacity(payload: usize) -> Self {
        let mut buf = Vec::with_capacity(MAX_SERVER_HEADER + payload);
        buf.resize(MAX_SERVER_HEADER, 0);
        FrameBuf { buf }
    }

    /// The buffer to append the payload to. Its first
    /// [`MAX_SERVER_HEADER`] bytes are reserved: only append.
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Completes the frame: one refcounted buffer holding header and payload.
    pub fn finish(mut self, opcode: OpCode) -> Bytes {
        let len = self.buf.len() - MAX_SERVER_HEADER;
        let mut head = [0u8; MAX_SERVER_HEADER];
        let n = write_header(&mut head, true, opcode, len);
        self.buf[..MAX_SERVER_HEADER].copy_from_slice(&head);
        Bytes::from(self.buf).slice(MAX_SERVER_HEADER - n..)
    }
}

/// Encodes a complete unmasked server frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut f = FrameBuf::with_capacity(payload.len());
    f.payload().extend_from_slice(payload);
    f.finish(opcode)
}

/// Encodes a masked client frame (for the client module and tests).
pub fn encode_masked(fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut head = [0u8; MAX_SERVER_HEADER];
    let n = write_header(&mut head, fin, opcode, payload.len());
    let mut out = Vec::with_capacity(n + 4 + payload.len());
    out.extend_from_slice(&head[MAX_SERVER_HEADER - n..]);
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes() {
        for (len, hl) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let f = encode(OpCode::Binary, &vec![7u8; len]);
            let h = parse_header(&f).unwrap().unwrap();
            assert_eq!(h.header_len, hl);
            assert_eq!(h.payload_len as usize, len);
            assert!(h.fin);
            assert_eq!(h.mask, None);
            assert_eq!(f.len(), hl + len);
        }
    }

    #[test]
    fn incomplete_headers() {
        let f = encode_masked(true, OpCode::Text, &[1u8; 300], [1, 2, 3, 4]);
        for cut in 0..8 {
            assert_eq!(parse_header(&f[..cut]), Ok(None), "cut {cut}");
        }
        assert!(parse_header(&f[..8]).unwrap().is_some());
    }

    #[test]
    fn rule_violations() {
        assert_eq!(parse_header(&[0x81 | 0x40, 0x80]), Err(WsError::RsvSet));
        assert_eq!(parse_header(&[0x83, 0x80]), Err(WsError::ReservedOpcode(3)));
        assert_eq!(
            parse_header(&[0x89, 0x80 | 126]),
            Err(WsError::ControlTooLong)
        );
        assert_eq!(parse_header(&[0x09, 0x80]), Err(WsError::FragmentedControl));
        let mut big = vec![0x82, 0x80 | 127];
        big.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&big), Err(WsError::BadLength));
    }

    #[test]
    fn unmask_matches_bytewise() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mask = [0x12, 0x34, 0x56, 0x78];
            let mut a = data.clone();
            unmask(&mut a, mask);
            let b: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(a, b);
        }
    }
}
