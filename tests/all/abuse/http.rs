//! Request framing that two readers could understand differently is
//! refused, on the server API and on the upgrade.

use crate::common::*;

#[test]
fn conflicting_content_lengths_are_refused() {
    let key = "http-test-key-0123456789";
    let s = Server::with_api(key);
    let api = s.api_addr();
    let body = r#"{"channelId":"general","content":"x"}"#;
    for framing in [
        format!("Content-Length: {}\r\nContent-Length: 5\r\n", body.len()),
        format!("Content-Length: {0}\r\nContent-Length: {0}\r\n", body.len()),
        format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ),
        format!("Content-Length: +{}\r\n", body.len()),
    ] {
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {key}\r\n{framing}\r\n{body}"
        );
        let out = http_raw(api, req.as_bytes());
        assert!(out.starts_with("HTTP/1.1 400"), "{framing:?}: {out}");
        assert!(out.contains("Content-Length"), "{out}");
    }
    // An upgrade that frames a body is refused too.
    let req = upgrade_request("/ws", "Content-Length: 10\r\n");
    let out = http_raw(s.addr, req.as_bytes());
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Well-framed requests are served.
    let (status, _) = api_call(
        api,
        "POST",
        "/api/publish",
        key,
        Some(serde_json::from_str(body).unwrap()),
    );
    assert_eq!(status, 200);
}
