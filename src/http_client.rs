//! A small blocking HTTP/1.1 client for the calls the node makes to the
//! application backend: one keep-alive connection, a timeout on every
//! step, responses read by `Content-Length`, chunks or the end of the
//! connection. Plain `http://` only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where requests go: `http://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// The path and query, `/` at least.
    pub path: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, String> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => {
                return Err(format!(
                    "`{url}`: https is not supported yet; reach the backend over http (a private network, or a TLS proxy beside the node)"
                ))
            }
            _ => return Err(format!("`{url}` is not an http:// URL")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(format!("`{url}`: credentials in the URL are not supported"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("`{url}`: `{p}` is not a port"))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("`{url}` names no host"));
        }
        Ok(Url {
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header's value.
    fn host_header(&self) -> String {
        match self.port {
            80 => self.host.clone(),
            p => format!("{}:{p}", self.host),
        }
    }
}

/// An answer: its status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a request has no answer.
#[derive(Debug)]
pub enum Failure {
    /// No connection (refused, unreachable, name not found).
    Connect(String),
    /// The connection broke or timed out, or the answer was not HTTP.
    Exchange(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Exchange(e) => write!(f, "{e}"),
        }
    }
}

/// An answer's body larger than this is a failure (the node reads
/// answers, not files).
const MAX_BODY: usize = 1 << 20;

pub struct Client {
    url: Url,
    timeout: Duration,
    conn: Option<TcpStream>,
    user_agent: String,
}

impl Client {
    pub fn new(url: Url, timeout: Duration) -> Client {
        Client {
            url,
            timeout,
            conn: None,
            user_agent: format!("corecast/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// POSTs `body` (JSON) with extra `headers`. A kept-alive connection
    /// the backend closed meanwhile is replaced once at no cost.
    pub fn post_json(
        &mut self,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, Failure> {
        let mut head = Vec::with_capacity(256);
        let _ = write!(
            head,
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.url.path,
            self.url.host_header(),
            self.user_agent,
            body.len()
        );
        for (k, v) in headers {
            let _ = write!(head, "{k}: {v}\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let reused = self.conn.is_some();
        match self.exchange(&head, body) {
            Err(Failure::Exchange(_)) if reused => self.exchange(&head, body),
            r => r,
        }
    }

    fn connect(&self) -> Result<TcpStream, Failure> {
        let addrs: Vec<SocketAddr> = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(|e| Failure::Connect(format!("{}: {e}", self.url.host)))?
            .collect();
        let mut last = format!("{} has no address", self.url.host);
        for a in addrs {
            match TcpStream::connect_timeout(&a, self.timeout) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    s.set_read_timeout(Some(self.timeout))
                        .and_then(|_| s.set_write_timeout(Some(self.timeout)))
                        .map_err(|e| Failure::Connect(e.to_string()))?;
                    return Ok(s);
                }
                Err(e) => last = format!("{a}: {e}"),
            }
        }
        Err(Failure::Connect(last))
    }

    fn exchange(&mut self, head: &[u8], body: &[u8]) -> Result<Response, Failure> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.connect()?,
        };
        let broke = |e: std::io::Error| Failure::Exchange(e.to_string());
        write_both(&mut conn, head, body).map_err(broke)?;
        let (response, keep) = read_response(&mut conn)?;
        if keep {
            self.conn = Some(conn);
        }
        Ok(response)
    }
}

/// Reads one response; `true` with it when the connection may be used
/// again.
fn read_response(conn: &mut impl Read) -> Result<(Response, bool), Failure> {
    let bad = |e: String| Failure::Exchange(e);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 8192];
    let (status, head_len, length, chunked, close) = loop {
        let n = conn
            .read(&mut chunk)
            .map_err(|e| bad(format!("reading the answer: {e}")))?;
        if n == 0 {
            return Err(bad("the connection closed before an answer".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = r.code.unwrap_or(0);
                let mut length = None;
                let mut chunked = false;
                let mut close = r.version == Some(0);
                for h in r.headers.iter() {
                    let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = Some(
                            v.parse::<usize>()
                                .map_err(|_| bad(format!("Content-Length `{v}`")))?,
                        );
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = v.to_ascii_lowercase().contains("chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = v.eq_ignore_ascii_case("close");
                    }
                }
                break (status, len, length, chunked, close);
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 << 10 => continue,
            Ok(httparse::Status::Partial) => return Err(bad("an answer head over 64 KiB".into())),
            Err(e) => return Err(bad(format!("not an HTTP answer: {e}"))),
        }
    };
    let mut rest = buf.split_off(head_len);
    let body = if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            // A chunk: its size in hex, a line end, the bytes, a line end.
            let Some(eol) = find(&rest[at..], b"\r\n") else {
                fill(conn, &mut rest)?;
                continue;
            };
            let line = std::str::from_utf8(&rest[at..at + eol]).unwrap_or("");
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("chunk size `{line}`")))?;
            let start = at + eol + 2;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                while find(&rest[start..], b"\r\n\r\n").is_none()
                    && !rest[start..].starts_with(b"\r\n")
                {
                    fill(conn, &mut rest)?;
                }
                break body;
            }
            if body.len() + size > MAX_BODY {
                return Err(too_large());
            }
            while rest.len() < start + size + 2 {
                fill(conn, &mut rest)?;
            }
            body.extend_from_slice(&rest[start..start + size]);
            at = start + size + 2;
        }
    } else if let Some(len) = length {
        if len > MAX_BODY {
            return Err(too_large());
        }
        while rest.len() < len {
            fill(conn, &mut rest)?;
        }
        rest.truncate(len);
        rest
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        // Up to the end of the connection.
        loop {
            let n = conn
                .read(&mut chunk)
                .map_err(|e| bad(format!("reading the answer: {e}")))?;
            if n == 0 {
                break rest;
            }
            if rest.len() + n > MAX_BODY {
                return Err(too_large());
            }
            rest.extend_from_slice(&chunk[..n]);
        }
    };
    let keep = !close && (chunked || length.is_some());
    Ok((Response { status, body }, keep))
}

/// Writes `a` then `b`, in one system call when the socket takes both
/// (the body is not copied behind the head).
fn write_both(w: &mut impl Write, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    use std::io::IoSlice;
    while !a.is_empty() || !b.is_empty() {
        let n = match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

fn too_large() -> Failure {
    Failure::Exchange(format!("an answer over {MAX_BODY} bytes"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more of the answer onto `buf`; the end of the connection here is
/// an error.
fn fill(conn: &mut impl Read, buf: &mut Vec<u8>) -> Result<(), Failure> {
    if buf.len() > 2 * MAX_BODY {
        return Err(Failure::Exchange("an answer over 2 MiB".into()));
    }
    let mut chunk = [0u8; 8192];
    let n = conn
        .read(&mut chunk)
        .map_err(|e| Failure::Exchange(format!("reading the answer: {e}")))?;
    if n == 0 {
        return Err(Failure::Exchange("the connection closed mid-answer".into()));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:9000/hooks/events?x=1").unwrap();
        assert_eq!(
            u,
            Url {
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/hooks/events?x=1".into()
            }
        );
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        let u = Url::parse("http://backend").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert_eq!(u.host_header(), "backend");
        let u = Url::parse("http://[::1]:81?q").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("[::1]", 81, "/?q")
        );
        assert!(Url::parse("https://x/").unwrap_err().contains("https"));
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("http://:80/").is_err());
        assert!(Url::parse("http://x:port/").is_err());
        assert!(Url::parse("http://u:p@x/").is_err());
    }

    fn read(text: &[u8]) -> Result<(Response, bool), Failure> {
        // Served a few bytes at a time.
        struct Slow<'a>(&'a [u8]);
        impl Read for Slow<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(7);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        read_response(&mut Slow(text))
    }

    #[test]
    fn head_and_body_go_whole_through_short_writes() {
        struct Short(Vec<u8>);
        impl Write for Short {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = buf.len().min(3);
                self.0.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = Short(Vec::new());
        write_both(&mut w, b"HEAD\r\n\r\n", b"the body").unwrap();
        assert_eq!(w.0, b"HEAD\r\n\r\nthe body");
    }

    #[test]
    fn answers_by_length_chunks_or_close() {
        let (r, keep) = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (200, &b"hello"[..], true)
        );
        let (r, keep) = read(
            b"HTTP/1.1 503 No\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n3;x=y\r\n!!!\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (503, &b"busy!!!"[..], true)
        );
        let (r, keep) = read(b"HTTP/1.0 200 OK\r\n\r\nuntil the end").unwrap();
        assert_eq!(
            (r.status, r.body.as_slice(), keep),
            (200, &b"until the end"[..], false)
        );
        let (r, keep) = read(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len(), keep), (204, 0, false));
        assert!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(read(b"SMTP ready\r\n\r\n").is_err());
        // Larger than an answer may be, announced or sent.
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(read(big.as_bytes()).is_err());
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        chunked.extend(format!("{:x}\r\n", MAX_BODY + 1).bytes());
        assert!(read(&chunked).is_err());
        assert!(read(b"").is_err());
    }
}
