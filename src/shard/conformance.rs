//! `corecast serve --socketio-conformance`: the behaviour the official
//! Engine.IO and Socket.IO protocol suites expect of the server they test
//! (as `/echo` is for Autobahn), not the product's event handling.
//!
//! - `/engine.io/`: every message packet comes back to its sender, binary
//!   as binary.
//! - `/socket.io/`: namespaces `/` and `/custom`; CONNECT is answered with
//!   `40{"sid"}` and the event `auth` carrying the CONNECT payload; an event
//!   `message` comes back as `message-back` with the same arguments, an
//!   event with an ack id is acknowledged with its own arguments (binary
//!   attachments included).

use crate::protocol::socketio::{self, PacketKind};
use crate::protocol::DecodeError;

/// What the conformance session sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Out {
    /// An Engine.IO packet as text (`4…` for a message).
    Text(String),
    /// A binary message (an attachment, or Engine.IO binary data).
    Binary(Vec<u8>),
    /// Text that goes in a write of its own, a moment later: the suite
    /// waits for one message at a time and misses a second one that comes
    /// in the same read.
    Later(String),
}

/// A binary packet waiting for its attachments.
#[derive(Debug)]
struct Waiting {
    /// The answer's header (`45` or `46` … up to the JSON) and its JSON.
    answer: String,
    left: usize,
    attachments: Vec<Vec<u8>>,
}

#[derive(Debug)]
pub(super) struct Conformance {
    /// Socket.IO on top (else Engine.IO echo).
    socketio: bool,
    namespaces: Vec<String>,
    waiting: Option<Waiting>,
}

const NAMESPACES: [&str; 2] = ["/", "/custom"];

impl Conformance {
    pub(super) fn new(socketio: bool) -> Self {
        Conformance {
            socketio,
            namespaces: Vec::new(),
            waiting: None,
        }
    }

    /// A binary message: echoed (Engine.IO), or an attachment of the
    /// packet waiting for it (Socket.IO).
    pub(super) fn on_binary(&mut self, data: &[u8]) -> Result<Vec<Out>, DecodeError> {
        if !self.socketio {
            return Ok(vec![Out::Binary(data.to_vec())]);
        }
        let Some(w) = self.waiting.as_mut() else {
            return Err(DecodeError::new(None, "an attachment nobody announced"));
        };
        w.attachments.push(data.to_vec());
        w.left -= 1;
        if w.left > 0 {
            return Ok(vec![]);
        }
        let w = self.waiting.take().expect("checked above");
        let mut out = vec![Out::Text(w.answer)];
        out.extend(w.attachments.into_iter().map(Out::Binary));
        Ok(out)
    }

    /// The data of an Engine.IO message packet (after its `4`).
    pub(super) fn on_message(&mut self, data: &[u8]) -> Result<Vec<Out>, DecodeError> {
        if !self.socketio {
            return Ok(vec![Out::Text(format!(
                "4{}",
                String::from_utf8_lossy(data)
            ))]);
        }
        let p = socketio::packet(data)?;
        let prefix = if p.nsp == "/" {
            String::new()
        } else {
            format!("{},", p.nsp)
        };
        let connected = self.namespaces.iter().any(|n| n == p.nsp);
        match p.kind {
            PacketKind::Connect if NAMESPACES.contains(&p.nsp) => {
                let payload: serde_json::Value = if p.data.is_empty() {
                    serde_json::json!({})
                } else {
                    serde_json::from_slice(p.data)
                        .map_err(|e| DecodeError::new(None, format!("CONNECT payload: {e}")))?
                };
                if !connected {
                    self.namespaces.push(p.nsp.to_owned());
                }
                let sid = format!("{:016x}", crate::clock::random_u64());
                Ok(vec![
                    Out::Text(format!("40{prefix}{}", serde_json::json!({ "sid": sid }))),
                    Out::Later(format!(
                        "42{prefix}{}",
                        serde_json::json!(["auth", payload])
                    )),
                ])
            }
            PacketKind::Connect => Ok(vec![Out::Text(format!(
                "44{},{}",
                p.nsp,
                serde_json::json!({ "message": "Invalid namespace" })
            ))]),
            PacketKind::Disconnect => {
                self.namespaces.retain(|n| n != p.nsp);
                Ok(vec![])
            }
            PacketKind::Event | PacketKind::BinaryEvent if connected => {
                let args: Vec<serde_json::Value> = serde_json::from_slice(p.data)
                    .map_err(|e| DecodeError::new(None, format!("invalid payload format: {e}")))?;
                let Some(serde_json::Value::String(name)) = args.first() else {
                    return Err(DecodeError::new(
                        None,
                        "invalid payload format: no event name",
                    ));
                };
                let rest = &args[1..];
                let binary = p.attachments > 0;
                let answer = match (p.id, name.as_str()) {
                    (Some(id), _) => {
                        let kind = if binary {
                            format!("6{}-", p.attachments)
                        } else {
                            "3".to_owned()
                        };
                        format!(
                            "4{kind}{prefix}{id}{}",
                            serde_json::Value::from(rest.to_vec())
                        )
                    }
                    (None, "message") => {
                        let kind = if binary {
                            format!("5{}-", p.attachments)
                        } else {
                            "2".to_owned()
                        };
                        let mut back = vec![serde_json::Value::from("message-back")];
                        back.extend_from_slice(rest);
                        format!("4{kind}{prefix}{}", serde_json::Value::from(back))
                    }
                    _ => return Ok(vec![]),
                };
                if binary {
                    self.waiting = Some(Waiting {
                        answer,
                        left: p.attachments as usize,
                        attachments: Vec::new(),
                    });
                    return Ok(vec![]);
                }
                Ok(vec![Out::Text(answer)])
            }
            PacketKind::ConnectError => Err(DecodeError::new(None, "CONNECT_ERROR from a client")),
            // Packets of namespaces not connected, and acks: nothing.
            _ => Ok(vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(out: Vec<Out>) -> Vec<String> {
        out.into_iter()
            .map(|o| match o {
                Out::Text(t) | Out::Later(t) => t,
                Out::Binary(b) => format!("<{b:?}>"),
            })
            .collect()
    }

    #[test]
    fn socketio_answers_as_the_suite_expects() {
        let mut c = Conformance::new(true);
        let out = texts(c.on_message(b"0{\"token\":\"123\"}").unwrap());
        assert!(out[0].starts_with("40{\"sid\":"), "{out:?}");
        assert_eq!(out[1], r#"42["auth",{"token":"123"}]"#);
        let out = texts(c.on_message(b"0/custom,").unwrap());
        assert!(out[0].starts_with("40/custom,{\"sid\":"), "{out:?}");
        assert_eq!(out[1], r#"42/custom,["auth",{}]"#);
        assert_eq!(
            texts(c.on_message(b"0/random").unwrap()),
            [r#"44/random,{"message":"Invalid namespace"}"#]
        );
        assert_eq!(
            texts(c.on_message(br#"2["message",1,"2",{"3":[true]}]"#).unwrap()),
            [r#"42["message-back",1,"2",{"3":[true]}]"#]
        );
        assert_eq!(
            texts(
                c.on_message(br#"2456["message-with-ack",1,"2",{"3":[false]}]"#)
                    .unwrap()
            ),
            [r#"43456[1,"2",{"3":[false]}]"#]
        );
        let head = br#"52-789["message-with-ack",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#;
        assert!(c.on_message(head).unwrap().is_empty());
        assert!(c.on_binary(&[1, 2, 3]).unwrap().is_empty());
        assert_eq!(
            texts(c.on_binary(&[4, 5, 6]).unwrap()),
            [
                r#"462-789[{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]"#,
                "<[1, 2, 3]>",
                "<[4, 5, 6]>"
            ]
        );
        assert!(c.on_message(b"1/custom,").unwrap().is_empty());
        assert!(c.on_message(br#"2/custom,["message"]"#).unwrap().is_empty());
        assert!(c.on_message(b"abc").is_err());
        assert!(c.on_message(b"2{}").is_err());
        assert!(c.on_message(br#"2abc["message-with-ack"]"#).is_err());
    }

    #[test]
    fn engine_io_echoes() {
        let mut c = Conformance::new(false);
        assert_eq!(texts(c.on_message(b"hello").unwrap()), ["4hello"]);
        assert_eq!(texts(c.on_binary(&[1, 2]).unwrap()), ["<[1, 2]>"]);
    }
}
