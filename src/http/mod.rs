//! HTTP beside the WebSocket upgrade: what a shard answers to a plain
//! request on the client port (`/health`, `/ready`, `/metrics`), and the
//! server API on its own listener ([`api`]). Every response is built by
//! [`crate::ws::handshake::response`].

pub mod api;

use crate::node::Node;
use crate::ws::handshake;

/// The answer to a plain HTTP request on the client port (`HEAD` gets
/// the same headers without the body).
pub fn plain(node: &Node, method: &str, path: &str) -> Vec<u8> {
    let mut response = plain_body(node, method, path);
    if method == "HEAD" {
        // Same headers (Content-Length included), no body.
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            response.truncate(end + 4);
        }
    }
    response
}

fn plain_body(node: &Node, method: &str, path: &str) -> Vec<u8> {
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return handshake::http_response(
            405,
            "Allow: GET\r\n",
            "text/plain",
            b"method_not_allowed",
        );
    }
    match path {
        "/health" => handshake::http_response(200, "", "text/plain", b"ok\n"),
        "/ready" if node.is_ready() => handshake::http_response(200, "", "text/plain", b"ready\n"),
        "/ready" => handshake::http_response(
            503,
            "",
            "text/plain",
            format!("{}\n", node.state_name()).as_bytes(),
        ),
        "/metrics" => handshake::http_response(
            200,
            "",
            "text/plain; version=0.0.4",
            node.metrics_text().as_bytes(),
        ),
        _ => handshake::http_response(404, "", "text/plain", b"not_found"),
    }
}
