//! MessagePack for `socket.io-msgpack-parser`: every Socket.IO packet is
//! one MessagePack map `{type, data, nsp, id}` in a binary message. The
//! packets are translated to and from their text form (`2/nsp,12[...]`)
//! through JSON values, so the rest of the Socket.IO code reads and writes
//! one form. Only what JSON can hold crosses: binary and extension values
//! are refused.

use serde_json::{Map, Number, Value};

use super::DecodeError;

/// Deepest nesting read.
const MAX_DEPTH: usize = 64;

fn bad(m: impl Into<String>) -> DecodeError {
    DecodeError::new(None, format!("invalid MessagePack: {}", m.into()))
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| bad("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }

    fn str(&mut self, n: usize) -> Result<Value, DecodeError> {
        let s =
            std::str::from_utf8(self.take(n)?).map_err(|_| bad("a string that is not UTF-8"))?;
        Ok(Value::String(s.to_owned()))
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value, DecodeError> {
        // Each element takes at least a byte: a length past the input is a lie.
        if n > self.buf.len() - self.at {
            return Err(bad("truncated"));
        }
        (0..n)
            .map(|_| self.value(depth + 1))
            .collect::<Result<_, _>>()
            .map(Value::Array)
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, DecodeError> {
        if n > self.buf.len() - self.at {
            return Err(bad("truncated"));
        }
        let mut m = Map::new();
        for _ in 0..n {
            let Value::String(k) = self.value(depth + 1)? else {
                return Err(bad("a map key that is not a string"));
            };
            let v = self.value(depth + 1)?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }

    fn value(&mut self, depth: usize) -> Result<Value, DecodeError> {
        if depth > MAX_DEPTH {
            return Err(bad("nested too deep"));
        }
        let b = self.byte()?;
        Ok(match b {
            0x00..=0x7f => Value::from(b),
            0x80..=0x8f => return self.map((b & 0x0f) as usize, depth),
            0x90..=0x9f => return self.array((b & 0x0f) as usize, depth),
            0xa0..=0xbf => return self.str((b & 0x1f) as usize),
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xca => {
                let f = f32::from_bits(self.uint(4)? as u32) as f64;
                Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            0xcb => {
                let f = f64::from_bits(self.uint(8)?);
                Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            0xcc => Value::from(self.uint(1)?),
            0xcd => Value::from(self.uint(2)?),
            0xce => Value::from(self.uint(4)?),
            0xcf => Value::from(self.uint(8)?),
            0xd0 => Value::from(self.uint(1)? as u8 as i8),
            0xd1 => Value::from(self.uint(2)? as u16 as i16),
            0xd2 => Value::from(self.uint(4)? as u32 as i32),
            0xd3 => Value::from(self.uint(8)? as i64),
            0xd9 => {
                let n = self.uint(1)? as usize;
                return self.str(n);
            }
            0xda => {
                let n = self.uint(2)? as usize;
                return self.str(n);
            }
            0xdb => {
                let n = self.uint(4)? as usize;
                return self.str(n);
            }
            0xdc => {
                let n = self.uint(2)? as usize;
                return self.array(n, depth);
            }
            0xdd => {
                let n = self.uint(4)? as usize;
                return self.array(n, depth);
            }
            0xde => {
                let n = self.uint(2)? as usize;
                return self.map(n, depth);
            }
            0xdf => {
                let n = self.uint(4)? as usize;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::from(b as i8),
            // notepack.io writes JavaScript's `undefined` (a CONNECT without
            // auth, an absent field) as the extension 0 with one zero byte.
            0xd4 if self.take(2)? == [0, 0] => Value::Null,
            0xc4..=0xc6 => return Err(bad("binary data (no event takes any)")),
            _ => return Err(bad(format!("unsupported type 0x{b:02x}"))),
        })
    }
}

/// Reads one MessagePack value (the whole input).
pub fn decode(buf: &[u8]) -> Result<Value, DecodeError> {
    let mut r = Reader { buf, at: 0 };
    let v = r.value(0)?;
    if r.at != buf.len() {
        return Err(bad("bytes after the value"));
    }
    Ok(v)
}

fn write_len(out: &mut Vec<u8>, n: usize, fix: Option<(u8, usize)>, tags: [u8; 3]) {
    match fix {
        Some((base, max)) if n <= max => out.push(base | n as u8),
        _ if n <= u8::MAX as usize && tags[0] != 0 => {
            out.push(tags[0]);
            out.push(n as u8);
        }
        _ if n <= u16::MAX as usize => {
            out.push(tags[1]);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(tags[2]);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
}

/// Appends `v` as MessagePack (as notepack.io writes it: the smallest form
/// of each integer, floats as float64).
pub fn encode(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(0xc0),
        Value::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                match u {
                    0..=0x7f => out.push(u as u8),
                    0x80..=0xff => out.extend_from_slice(&[0xcc, u as u8]),
                    0x100..=0xffff => {
                        out.push(0xcd);
                        out.extend_from_slice(&(u as u16).to_be_bytes());
                    }
                    0x1_0000..=0xffff_ffff => {
                        out.push(0xce);
                        out.extend_from_slice(&(u as u32).to_be_bytes());
                    }
                    _ => {
                        out.push(0xcf);
                        out.extend_from_slice(&u.to_be_bytes());
                    }
                }
            } else if let Some(i) = n.as_i64() {
                match i {
                    -32..=-1 => out.push(i as i8 as u8),
                    -128..=-33 => out.extend_from_slice(&[0xd0, i as i8 as u8]),
                    -32768..=-129 => {
                        out.push(0xd1);
                        out.extend_from_slice(&(i as i16).to_be_bytes());
                    }
                    -2_147_483_648..=-32769 => {
                        out.push(0xd2);
                        out.extend_from_slice(&(i as i32).to_be_bytes());
                    }
                    _ => {
                        out.push(0xd3);
                        out.extend_from_slice(&i.to_be_bytes());
                    }
                }
            } else {
                out.push(0xcb);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_be_bytes());
            }
        }
        Value::String(s) => {
            write_len(out, s.len(), Some((0xa0, 31)), [0xd9, 0xda, 0xdb]);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(a) => {
            write_len(out, a.len(), Some((0x90, 15)), [0, 0xdc, 0xdd]);
            for x in a {
                encode(x, out);
            }
        }
        Value::Object(m) => {
            write_len(out, m.len(), Some((0x80, 15)), [0, 0xde, 0xdf]);
            for (k, x) in m {
                encode(&Value::String(k.clone()), out);
                encode(x, out);
            }
        }
    }
}

/// A Socket.IO packet in its MessagePack form (`{type, data, nsp, id}`) as
/// its text form (`<type>[/nsp,][id]<json>`), which the Socket.IO reader
/// takes.
pub fn packet_to_text(buf: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let Value::Object(mut m) = decode(buf)? else {
        return Err(bad("a Socket.IO packet is a map"));
    };
    let kind = match m.get("type").and_then(Value::as_u64) {
        Some(k @ 0..=6) => k as u8,
        _ => return Err(bad("`type` must be 0 to 6")),
    };
    let nsp = match m.remove("nsp") {
        None => "/".to_owned(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("`nsp` must be a string")),
    };
    let id = match m.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad("`id` must be a non-negative integer"))?,
        ),
    };
    let mut out = vec![b'0' + kind];
    if nsp != "/" {
        out.extend_from_slice(nsp.as_bytes());
        out.push(b',');
    }
    if let Some(id) = id {
        out.extend_from_slice(id.to_string().as_bytes());
    }
    match m.remove("data") {
        None | Some(Value::Null) => {}
        Some(d) => serde_json::to_writer(&mut out, &d).expect("writing to a Vec cannot fail"),
    }
    Ok(out)
}

/// A Socket.IO packet's text form as the MessagePack map the parser sends.
pub fn packet_from_text(text: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let p = super::socketio::packet(text)?;
    let mut m = Map::new();
    let kind = match p.kind {
        super::socketio::PacketKind::Connect => 0,
        super::socketio::PacketKind::Disconnect => 1,
        super::socketio::PacketKind::Event => 2,
        super::socketio::PacketKind::Ack => 3,
        super::socketio::PacketKind::ConnectError => 4,
        super::socketio::PacketKind::BinaryEvent => 5,
        super::socketio::PacketKind::BinaryAck => 6,
    };
    m.insert("type".into(), Value::from(kind));
    if !p.data.is_empty() {
        let d: Value = serde_json::from_slice(p.data)
            .map_err(|e| DecodeError::new(None, format!("invalid packet data: {e}")))?;
        m.insert("data".into(), d);
    }
    m.insert("nsp".into(), Value::from(p.nsp));
    if let Some(id) = p.id {
        m.insert("id".into(), Value::from(id));
    }
    encode(&Value::Object(m), out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_round_trip() {
        for v in [
            json!(null),
            json!(true),
            json!(0),
            json!(127),
            json!(128),
            json!(65535),
            json!(65536),
            json!(u64::MAX),
            json!(-1),
            json!(-32),
            json!(-33),
            json!(-129),
            json!(-40000),
            json!(i64::MIN),
            json!(1.5),
            json!("é"),
            json!("x".repeat(40)),
            json!("y".repeat(300)),
            json!([1, [2, [3]], {"a": {"b": []}}]),
            json!((0..20).collect::<Vec<_>>()),
            Value::Object((0..20).map(|i| (format!("k{i}"), json!(i))).collect()),
        ] {
            let mut out = Vec::new();
            encode(&v, &mut out);
            assert_eq!(decode(&out).unwrap(), v, "{v}");
        }
    }

    #[test]
    fn what_notepack_writes_is_read() {
        // {type: 2, data: ["message:send", {channelId: "g"}], nsp: "/", id: 7}
        // as socket.io-msgpack-parser encodes it.
        let bytes = [
            0x84, 0xa4, b't', b'y', b'p', b'e', 0x02, 0xa4, b'd', b'a', b't', b'a', 0x92, 0xac,
            b'm', b'e', b's', b's', b'a', b'g', b'e', b':', b's', b'e', b'n', b'd', 0x81, 0xa9,
            b'c', b'h', b'a', b'n', b'n', b'e', b'l', b'I', b'd', 0xa1, b'g', 0xa3, b'n', b's',
            b'p', 0xa1, b'/', 0xa2, b'i', b'd', 0x07,
        ];
        assert_eq!(
            String::from_utf8(packet_to_text(&bytes).unwrap()).unwrap(),
            r#"27["message:send",{"channelId":"g"}]"#
        );
        let mut back = Vec::new();
        packet_from_text(br#"27["message:send",{"channelId":"g"}]"#, &mut back).unwrap();
        assert_eq!(decode(&back).unwrap(), decode(&bytes).unwrap());
    }

    #[test]
    fn packets_translate_both_ways() {
        for text in [
            &br#"0{"token":"t"}"#[..],
            b"0",
            b"1",
            br#"2["a",{"b":1}]"#,
            br#"2/chat,5["a"]"#,
            br#"312[{"success":true}]"#,
            br#"4{"message":"no"}"#,
        ] {
            let mut mp = Vec::new();
            packet_from_text(text, &mut mp).unwrap();
            assert_eq!(
                packet_to_text(&mp).unwrap(),
                text,
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(decode(&[]).is_err());
        assert!(decode(&[0xc4, 1, 0]).is_err(), "binary");
        assert!(decode(&[0xc1]).is_err());
        assert_eq!(decode(&[0xd4, 0, 0]).unwrap(), Value::Null, "undefined");
        assert!(decode(&[0xd4, 1, 0]).is_err(), "another extension");
        assert!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err(),
            "a length past the input"
        );
        assert!(decode(&[0x91, 0x91, 0x91]).is_err());
        assert!(decode(&[0xc0, 0xc0]).is_err(), "trailing bytes");
        let deep = [0x91u8; 100];
        assert!(decode(&deep).is_err());
        assert!(decode(&[0x81, 0x01, 0x01]).is_err(), "a non-string key");
        assert!(packet_to_text(&[0x81, 0xa4, b't', b'y', b'p', b'e', 0x09]).is_err());
        assert!(packet_to_text(&[0x90]).is_err());
    }
}
