//! `--protocol socketio`: the same workloads against a Socket.IO 4 server
//! (the peers of `scripts/peers/socketio/`), over Engine.IO 4's WebSocket
//! transport without polling: connect to `<url>?EIO=4&transport=websocket`,
//! read the open packet (`0{...}`), join the default namespace with
//! `40{"token":...}`, then events are `42["name",data]`, with an ack id
//! `42<id>["name",data]` answered by `43<id>[...]`. The server's pings (`2`)
//! are answered (`3`) by the reader.

use std::net::IpAddr;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use serde_json::json;

use super::BenchError;
use crate::client::{
    connect_tcp, handshake_request, new_key, parse_handshake_response, FrameReader, Masker, Url,
};
use crate::ws::OpCode;

/// The URL of the WebSocket transport.
pub fn transport_url(url: &Url) -> Url {
    url.with_query("EIO", "4")
        .with_query("transport", "websocket")
}

/// Connects, joins the default namespace with `token`, and, with `room`,
/// sends `channel:join` and waits for its ack.
pub async fn open(
    url: &Url,
    source: Option<IpAddr>,
    token: &str,
    room: Option<&str>,
    timeout: Duration,
) -> Result<(TcpStream, FrameReader), BenchError> {
    let io = |e: std::io::Error| BenchError(format!("socket.io: {e}"));
    let addr = url.resolve()?;
    let mut stream = monoio::time::timeout(timeout, connect_tcp(addr, source))
        .await
        .map_err(|_| BenchError("socket.io: the TCP connection timed out".into()))?
        .map_err(io)?;
    let key = new_key();
    let (r, _) = stream
        .write_all(handshake_request(&transport_url(url), &key, None, None))
        .await;
    r.map_err(io)?;
    let mut frames = FrameReader::new(16 << 20);
    let mut head = Vec::new();
    let resp = loop {
        let (r, buf) = monoio::time::timeout(timeout, stream.read(Vec::with_capacity(4096)))
            .await
            .map_err(|_| BenchError("socket.io: no upgrade response".into()))?;
        if r.map_err(io)? == 0 {
            return Err(BenchError("socket.io: closed during the upgrade".into()));
        }
        head.extend_from_slice(&buf);
        if let Some(resp) = parse_handshake_response(&head, &key)? {
            break resp;
        }
    };
    frames.extend(&head[resp.head_len..]);
    let mut masker = Masker::new();
    // The open packet, then the namespace.
    next_text(&mut stream, &mut frames, &mut masker, timeout, |p| {
        p.starts_with(b"0")
    })
    .await?;
    let connect = format!("40{}", json!({ "token": token }));
    let (r, _) = stream
        .write_all(masker.frame(OpCode::Text, connect.as_bytes()))
        .await;
    r.map_err(io)?;
    let got = next_text(&mut stream, &mut frames, &mut masker, timeout, |p| {
        p.starts_with(b"40") || p.starts_with(b"44")
    })
    .await?;
    if got.starts_with(b"44") {
        return Err(BenchError(format!(
            "socket.io refused the connection: {}",
            String::from_utf8_lossy(&got)
        )));
    }
    if let Some(room) = room {
        let join = format!("421{}", json!(["channel:join", { "channelId": room }]));
        let (r, _) = stream
            .write_all(masker.frame(OpCode::Text, join.as_bytes()))
            .await;
        r.map_err(io)?;
        next_text(&mut stream, &mut frames, &mut masker, timeout, |p| {
            p.starts_with(b"431")
        })
        .await?;
    }
    Ok((stream, frames))
}

/// Reads until a text frame `want` accepts; answers pings meanwhile (a
/// slow server pings while a join waits).
async fn next_text(
    stream: &mut TcpStream,
    frames: &mut FrameReader,
    masker: &mut Masker,
    timeout: Duration,
    want: impl Fn(&[u8]) -> bool,
) -> Result<Vec<u8>, BenchError> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut pongs = Vec::new();
        while let Some(f) = frames
            .next()
            .map_err(|e| BenchError(format!("socket.io: {e}")))?
        {
            if f.opcode == OpCode::Close {
                return Err(BenchError(
                    "socket.io: the server closed the connection".into(),
                ));
            }
            if f.opcode == OpCode::Text && is_ping(f.payload) {
                masker.append(&mut pongs, OpCode::Text, b"3");
            } else if f.opcode == OpCode::Text && want(f.payload) {
                return Ok(f.payload.to_vec());
            }
        }
        if !pongs.is_empty() {
            let (r, _) = stream.write_all(pongs).await;
            r.map_err(|e| BenchError(format!("socket.io: {e}")))?;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let buf = frames.take_buf(4096);
        let (r, buf) = monoio::time::timeout(left, stream.read(buf))
            .await
            .map_err(|_| BenchError("socket.io: no answer in time".into()))?;
        frames.put_buf(buf);
        if r.map_err(|e| BenchError(format!("socket.io: {e}")))? == 0 {
            return Err(BenchError(
                "socket.io: the server closed the connection".into(),
            ));
        }
    }
}

/// A publish: `message:send` to `room` without an ack.
pub fn publish(out: &mut Vec<u8>, masker: &mut Masker, room: &str, content: &str) {
    let p = format!(
        "42{}",
        json!(["message:send", { "channelId": room, "content": content }])
    );
    masker.append(out, OpCode::Text, p.as_bytes());
}

/// The content of a delivered `message:new`.
pub fn content_of(payload: &[u8]) -> Option<&[u8]> {
    const NEW: &[u8] = br#"42["message:new","#;
    const CONTENT: &[u8] = br#""content":""#;
    if !payload.starts_with(NEW) {
        return None;
    }
    let at = memchr::memmem::find(&payload[NEW.len()..], CONTENT)?;
    Some(&payload[NEW.len() + at + CONTENT.len()..])
}

/// Whether a text frame is an Engine.IO ping (answered with `3`).
pub fn is_ping(payload: &[u8]) -> bool {
    payload == b"2"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_read_and_written_as_socket_io_does() {
        let url: Url = "ws://127.0.0.1:3000/socket.io/".parse().unwrap();
        assert_eq!(
            transport_url(&url).path,
            "/socket.io/?EIO=4&transport=websocket"
        );
        let frame = br#"42["message:new",{"channelId":"r","content":"00000000000000000123-x"}]"#;
        assert!(content_of(frame)
            .unwrap()
            .starts_with(b"00000000000000000123"));
        assert_eq!(content_of(br#"42["channel:member_joined",{}]"#), None);
        let mut out = Vec::new();
        publish(&mut out, &mut Masker::new(), "r", "hi");
        assert!(out.len() > 30);
        assert!(is_ping(b"2") && !is_ping(b"3"));
    }
}
