//! The baseline for side-by-side figures: a plain broadcast server written
//! the way most Rust services are, on tokio with fastwebsockets, one task
//! per connection (plus one forwarding the room's broadcast), a room map
//! behind a mutex and a `tokio::sync::broadcast` channel per room.
//!
//! It speaks the `raw` contract of `corecast bench --protocol raw`: connect
//! to `ws://ADDR/?room=NAME`; every text message a client sends reaches
//! every member of its room, the sender included.
//!
//!     cargo run --release --example baseline -- 127.0.0.1:9400
//!
//! It prints `baseline listening on ADDR` once ready. Run it pinned to one
//! core (`taskset -c 0`): tokio then starts one worker thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

type Rooms = Arc<Mutex<HashMap<String, broadcast::Sender<Bytes>>>>;

/// Messages a slow member may fall behind before it misses some.
const ROOM_BACKLOG: usize = 4096;

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9400".into());
    let listener = TcpListener::bind(&addr).await.expect("bind");
    eprintln!("baseline listening on {}", listener.local_addr().unwrap());
    let rooms: Rooms = Arc::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let rooms = rooms.clone();
        tokio::spawn(async move {
            let _ = serve(stream, rooms).await;
        });
    }
}

/// Reads the upgrade request; answers 101 and returns the room.
async fn handshake(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() > 16 * 1024 || stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(_) = req.parse(&buf).ok()? {
            let key = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .and_then(|h| std::str::from_utf8(h.value).ok())?;
            let path = req.path?;
            let room = path
                .split_once('?')
                .and_then(|(_, q)| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("room="))
                        .map(String::from)
                })
                .unwrap_or_else(|| "default".into());
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                corecast::ws::handshake::accept_key(key)
            );
            stream.write_all(resp.as_bytes()).await.ok()?;
            return Some(room);
        }
    }
}

async fn serve(mut stream: TcpStream, rooms: Rooms) -> Option<()> {
    stream.set_nodelay(true).ok()?;
    let room = handshake(&mut stream).await?;
    let tx = rooms
        .lock()
        .unwrap()
        .entry(room)
        .or_insert_with(|| broadcast::channel(ROOM_BACKLOG).0)
        .clone();
    let mut rx = tx.subscribe();
    let ws = WebSocket::after_handshake(stream, Role::Server);
    let (mut read, write) = ws.split(tokio::io::split);
    let write = Arc::new(tokio::sync::Mutex::new(write));
    let forward = {
        let write = write.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(msg) => {
                        let frame = Frame::text(Payload::Borrowed(&msg));
                        if write.lock().await.write_frame(frame).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    };
    loop {
        let frame = read
            .read_frame(&mut |f| {
                let write = write.clone();
                async move { write.lock().await.write_frame(f).await }
            })
            .await;
        match frame {
            Ok(f) if f.opcode == OpCode::Text => {
                let _ = tx.send(Bytes::copy_from_slice(&f.payload));
            }
            Ok(f) if f.opcode == OpCode::Close => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    forward.abort();
    Some(())
}
