//! [`Client`]: one connection on monoio, built from the sans-IO pieces.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::{
    decode_message, encode_message, handshake_request, new_key, parse_handshake_response,
    ClientError, FrameReader, Masker, Url,
};
use crate::protocol::{ClientEvent, ClientMessage, Protocol, Ready, ServerEvent, ServerMessage};
use crate::ws::OpCode;

/// How to reach and authenticate with a server.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub url: Url,
    /// A JWT, sent as `?token=` (or authenticate later with an `auth` event).
    pub token: Option<String>,
    /// The protocol to offer; the server's default (JSON) when `None`.
    pub protocol: Option<Protocol>,
    /// The local address to connect from (several let one machine open
    /// more connections than one address has ports).
    pub source_ip: Option<IpAddr>,
    /// The largest message accepted from the server.
    pub max_message: usize,
    /// Bound on connecting, on the upgrade and on each [`Client::call`].
    pub timeout: Duration,
}

impl ConnectOptions {
    pub fn new(url: Url) -> ConnectOptions {
        ConnectOptions {
            url,
            token: None,
            protocol: None,
            source_ip: None,
            max_message: 16 << 20,
            timeout: Duration::from_secs(10),
        }
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    pub fn source_ip(mut self, ip: IpAddr) -> Self {
        self.source_ip = Some(ip);
        self
    }
}

/// Opens a TCP connection to `addr` with `TCP_NODELAY`, from `source` when
/// given (bound with `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen per
/// destination and one source address serves the whole port range).
pub async fn connect_tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect_addr(addr).await?,
        Some(ip) => {
            use socket2::{Domain, SockAddr, Socket, Type};
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            if ip.is_ipv4() {
                let one: libc::c_int = 1;
                // SAFETY: a valid socket and a pointer to a c_int of the
                // size given.
                unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&s),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        (&one as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
            s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
            match s.connect(&SockAddr::from(addr)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            let std_stream: std::net::TcpStream = s.into();
            let stream = TcpStream::from_std(std_stream)?;
            stream.writable(false).await?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
            // SAFETY: `stream` owns this descriptor and outlives the borrow.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            if let Some(e) = socket2::SockRef::from(&fd).take_error()? {
                return Err(e);
            }
            stream
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connection to a corecast server.
///
/// Runs inside a monoio runtime with its timer enabled. Pings are answered
/// while reading; events that arrive while [`Client::call`] waits for an ack
/// are kept and returned, in order, by [`Client::next_event`]. After an error
/// the connection is unusable: drop it and connect again.
pub struct Client {
    stream: TcpStream,
    reader: FrameReader,
    masker: Masker,
    protocol: Protocol,
    next_id: u64,
    pending: VecDeque<ServerMessage>,
    ready: Option<Ready>,
    timeout: Duration,
}

impl Client {
    /// Connects, upgrades, and, when a token is given, waits for `ready`.
    pub async fn connect(opts: &ConnectOptions) -> Result<Client, ClientError> {
        if matches!(
            opts.protocol,
            Some(Protocol::SocketIo | Protocol::SocketIoMsgpack)
        ) {
            return Err(ClientError::Handshake(
                "this client speaks corecast.json and corecast.bin; Socket.IO clients connect to the Socket.IO path".into(),
            ));
        }
        let addr = opts.url.resolve()?;
        let t = opts.timeout;
        let stream = monoio::time::timeout(t, connect_tcp(addr, opts.source_ip))
            .await
            .map_err(|_| ClientError::Timeout("the TCP connection"))??;
        let url = match &opts.token {
            Some(tok) => opts.url.with_query("token", tok),
            None => opts.url.clone(),
        };
        let key = new_key();
        let mut c = Client {
            stream,
            reader: FrameReader::new(opts.max_message),
            masker: Masker::new(),
            protocol: opts.protocol.unwrap_or(Protocol::Json),
            next_id: 1,
            pending: VecDeque::new(),
            ready: None,
            timeout: t,
        };
        c.write(handshake_request(&url, &key, opts.protocol, None))
            .await?;
        let mut head = Vec::new();
        let resp = loop {
            let chunk = monoio::time::timeout(t, c.read_chunk())
                .await
                .map_err(|_| ClientError::Timeout("the upgrade response"))??;
            head.extend_from_slice(&chunk);
            if let Some(r) = parse_handshake_response(&head, &key)? {
                break r;
            }
        };
        c.reader.extend(&head[resp.head_len..]);
        match (opts.protocol, resp.protocol) {
            (Some(want), Some(got)) if want != got => {
                return Err(ClientError::Handshake(format!(
                    "asked for {} and got {}",
                    want.name(),
                    got.name()
                )))
            }
            (Some(Protocol::Binary), None) => {
                return Err(ClientError::Handshake(
                    "the server did not accept corecast.bin".into(),
                ))
            }
            _ => {}
        }
        c.protocol = resp.protocol.unwrap_or(Protocol::Json);
        if opts.token.is_some() {
            c.wait_ready().await?;
        }
        Ok(c)
    }

    /// Authenticates with an `auth` event (when no token was given at
    /// connect) and waits for `ready`.
    pub async fn authenticate(&mut self, token: &str) -> Result<&Ready, ClientError> {
        self.send(ClientEvent::Auth(crate::protocol::Auth {
            token: token.into(),
        }))
        .await?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<&Ready, ClientError> {
        loop {
            let m = monoio::time::timeout(self.timeout, self.read_message())
                .await
                .map_err(|_| ClientError::Timeout("ready"))??;
            match m.event {
                ServerEvent::Ready(r) => {
                    self.ready = Some(r);
                    return Ok(self.ready.as_ref().expect("just set"));
                }
                ServerEvent::Error(e) => return Err(ClientError::Server(e)),
                _ => self.pending.push_back(m),
            }
        }
    }

    /// The `ready` event of this session, once authenticated.
    pub fn ready(&self) -> Option<&Ready> {
        self.ready.as_ref()
    }

    /// The negotiated protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The socket and the reader (with any bytes already received), for
    /// programs that drive the connection themselves, as `corecast bench`
    /// does. Events kept by [`Client::call`] are dropped.
    pub fn into_parts(self) -> (TcpStream, FrameReader) {
        (self.stream, self.reader)
    }

    /// Sends an event without an ack id.
    pub async fn send(&mut self, event: ClientEvent) -> Result<(), ClientError> {
        let f = encode_message(
            self.protocol,
            &ClientMessage { id: None, event },
            &mut self.masker,
        );
        self.write(f).await
    }

    /// Sends an event with a fresh ack id and waits for its `ack`; an
    /// `error` answer becomes [`ClientError::Server`].
    pub async fn call(&mut self, event: ClientEvent) -> Result<ServerMessage, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let f = encode_message(
            self.protocol,
            &ClientMessage {
                id: Some(id),
                event,
            },
            &mut self.masker,
        );
        self.write(f).await?;
        loop {
            let m = monoio::time::timeout(self.timeout, self.read_message())
                .await
                .map_err(|_| ClientError::Timeout("an ack"))??;
            if m.id == Some(id) {
                return match m.event {
                    ServerEvent::Error(e) => Err(ClientError::Server(e)),
                    _ => Ok(m),
                };
            }
            self.pending.push_back(m);
        }
    }

    /// The next server event (kept ones first).
    pub async fn next_event(&mut self) -> Result<ServerMessage, ClientError> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        self.read_message().await
    }

    /// Sends a close frame and waits (bounded) for the server's.
    pub async fn close(mut self, code: u16, reason: &str) -> Result<(), ClientError> {
        let f = self
            .masker
            .frame(OpCode::Close, &crate::ws::close::payload(code, reason));
        // The server answers with its own close frame, then closes.
        self.write(f).await?;
        let t = self.timeout;
        let wait = async {
            loop {
                match self.read_message().await {
                    Err(ClientError::Closed { .. }) => return Ok(()),
                    Err(e) => return Err(e),
                    Ok(_) => {}
                }
            }
        };
        monoio::time::timeout(t, wait)
            .await
            .map_err(|_| ClientError::Timeout("the close handshake"))?
    }

    async fn write(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        let (r, _) = self.stream.write_all(data).await;
        r?;
        Ok(())
    }

    async fn read_chunk(&mut self) -> Result<Vec<u8>, ClientError> {
        let (r, buf) = self.stream.read(Vec::with_capacity(16 * 1024)).await;
        match r? {
            0 => Err(ClientError::Closed {
                code: None,
                reason: String::new(),
            }),
            _ => Ok(buf),
        }
    }

    async fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        loop {
            let mut reply = None;
            if let Some(f) = self.reader.next()? {
                match f.opcode {
                    OpCode::Text | OpCode::Binary => {
                        return decode_message(self.protocol, f.payload);
                    }
                    OpCode::Ping => reply = Some(self.masker.frame(OpCode::Pong, f.payload)),
                    OpCode::Close => {
                        let (code, reason) = crate::ws::close::parse(f.payload);
                        let echo = f.payload.get(..2).unwrap_or_default().to_vec();
                        let frame = self.masker.frame(OpCode::Close, &echo);
                        let _ = self.write(frame).await;
                        return Err(ClientError::Closed { code, reason });
                    }
                    _ => {}
                }
            } else {
                let chunk = self.read_chunk().await?;
                self.reader.extend(&chunk);
            }
            if let Some(pong) = reply {
                self.write(pong).await?;
            }
        }
    }
}
