#!/usr/bin/env python3
"""An application backend for corecast, in one file of standard Python.

It takes corecast's event stream (signed, batched webhooks) and stores the
channels' messages in SQLite, de-duplicating by channel, epoch and offset,
so that a batch delivered twice (corecast delivers at least once) is
stored once. The optional kinds (`events_include`: joins and leaves, read
receipts, direct messages) are kept too, de-duplicated by their `id`.
Read docs/BACKEND.md for the walk-through.

    python3 examples/backend/backend.py --port 9100 --db messages.db \\
        --secret "$CORECAST_WEBHOOK_SECRET"

Endpoints:
    POST /corecast/events    the webhook (configure it as webhook.url)
    POST /corecast/publish   the publish hook (hooks.publish_url): rejects
                             messages with a word of BLOCKED, rewrites
                             `/shout text` to upper case, attaches the
                             links of a message as its `meta`, lets the
                             rest by
    POST /corecast/rpc       rpc (hooks.rpc_url): methods echo, add, whoami
    POST /corecast/connect   the connect hook (hooks.connect_url): refuses
                             suspended users, makes mod-* users moderators,
                             joins everyone to `lobby` and their own
                             `inbox-USER`; with connect_auth = backend it
                             reads session tokens `sess-USER` itself
    GET  /messages?channel=C the stored messages of channel C, oldest first
    GET  /events             every event stored, in the order it arrived
    GET  /activity           every optional event stored, in arrival order
    GET  /dms?user=U         the direct messages U sent or received
    GET  /stats              requests, events received and stored
"""

import argparse
import hashlib
import hmac
import json
import os
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

# A signature older than this is refused (a replayed request).
MAX_SKEW_MS = 5 * 60 * 1000

# Words the publish hook does not let through.
BLOCKED = {"spam", "forbidden"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    channel TEXT NOT NULL,
    epoch TEXT NOT NULL,
    offset INTEGER NOT NULL,
    at INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    UNIQUE (channel, epoch, offset)
);
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    user_id TEXT NOT NULL,
    content TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    edited_at INTEGER,
    reactions TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS activity (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    id TEXT NOT NULL UNIQUE,                -- the optional event's own id
    channel TEXT,                           -- none for a direct message
    at INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dms (
    message_id TEXT PRIMARY KEY,
    from_user TEXT NOT NULL,
    to_user TEXT NOT NULL,
    content TEXT NOT NULL,
    sent_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def verify(secret: bytes, header: str, body: bytes, now_ms: int) -> bool:
    """Checks `X-Corecast-Signature: t=MS,v1=HEX` (HMAC-SHA256 of `MS.BODY`)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    t, sig = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or abs(now_ms - int(t)) > MAX_SKEW_MS:
        return False
    want = hmac.new(secret, t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, sig)


class Store:
    def __init__(self, path):
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    def bump(self, name, n):
        self.db.execute(
            "INSERT INTO stats VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )

    def take(self, events):
        """Stores a batch in one transaction; returns (stored, duplicates)."""
        stored = 0
        with self.lock, self.db:
            for e in events:
                ev = e["event"]
                if "offset" not in e:
                    # An optional kind: its own id names it.
                    cur = self.db.execute(
                        "INSERT OR IGNORE INTO activity (id, channel, at, type, data) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (e["id"], e.get("channel"), e["at"], ev["t"], json.dumps(ev["d"])),
                    )
                    if cur.rowcount == 1:
                        stored += 1
                        self.apply(ev["t"], ev["d"])
                    continue
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO events (channel, epoch, offset, at, type, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (e["channel"], e["epoch"], e["offset"], e["at"], ev["t"], json.dumps(ev["d"])),
                )
                if cur.rowcount == 0:
                    continue  # delivered before: already applied
                stored += 1
                self.apply(ev["t"], ev["d"])
            self.bump("requests", 1)
            self.bump("received", len(events))
            self.bump("stored", stored)
        return stored, len(events) - stored

    def apply(self, kind, d):
        if kind == "dm:new":
            self.db.execute(
                "INSERT OR IGNORE INTO dms VALUES (?, ?, ?, ?, ?)",
                (d["messageId"], d["fromUserId"], d["toUserId"], d["content"], d["timestamp"]),
            )
        elif kind == "message:new":
            self.db.execute(
                "INSERT OR REPLACE INTO messages (message_id, channel, user_id, content, sent_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (d["messageId"], d["channelId"], d["userId"], d["content"], d["timestamp"]),
            )
        elif kind == "message:edited":
            self.db.execute(
                "UPDATE messages SET content = ?, edited_at = ? WHERE message_id = ?",
                (d["content"], d["editedAt"], d["messageId"]),
            )
        elif kind == "message:deleted":
            self.db.execute("DELETE FROM messages WHERE message_id = ?", (d["messageId"],))
        elif kind == "message:reaction":
            row = self.db.execute(
                "SELECT reactions FROM messages WHERE message_id = ?", (d["messageId"],)
            ).fetchone()
            if row:
                reactions = json.loads(row[0])
                reactions[d["emoji"]] = d["count"]
                if d["count"] == 0:
                    reactions.pop(d["emoji"])
                self.db.execute(
                    "UPDATE messages SET reactions = ? WHERE message_id = ?",
                    (json.dumps(reactions), d["messageId"]),
                )

    def count(self, name):
        with self.lock, self.db:
            self.bump(name, 1)

    def query(self, sql, args=()):
        with self.lock:
            return self.db.execute(sql, args).fetchall()


def handler(store, secret):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: corecast reuses its connection

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            path = urlparse(self.path).path
            if path not in ("/corecast/events", "/corecast/publish", "/corecast/rpc", "/corecast/connect"):
                return self.answer(404, {"error": "not found"})
            sig = self.headers.get("X-Corecast-Signature", "")
            if not verify(secret, sig, body, int(time.time() * 1000)):
                return self.answer(401, {"error": "bad signature"})
            if path == "/corecast/publish":
                return self.publish_hook(body)
            if path == "/corecast/rpc":
                return self.rpc(body)
            if path == "/corecast/connect":
                return self.connect_hook(body)
            try:
                events = json.loads(body)["events"]
            except (ValueError, KeyError) as e:
                return self.answer(400, {"error": f"not a batch of events: {e}"})
            stored, duplicates = store.take(events)
            self.answer(200, {"stored": stored, "duplicates": duplicates})

        def rpc(self, body):
            """A client's call: answered with data, or an error it gets."""
            try:
                call = json.loads(body)
                method, user = call["method"], call["userId"]
            except (ValueError, KeyError) as e:
                return self.answer(400, {"error": f"not a call: {e}"})
            store.count("rpc")
            data = call.get("data")
            if method == "slow":
                time.sleep(1.5)
                return self.answer(200, {"data": data})
            if method == "echo":
                return self.answer(200, {"data": data})
            if method == "add":
                try:
                    return self.answer(200, {"data": sum(data)})
                except TypeError:
                    return self.answer(200, {"error": {"code": "bad_request", "message": "add takes a list of numbers"}})
            if method == "whoami":
                return self.answer(200, {"data": {"userId": user}})
            self.answer(200, {"error": {"code": "not_found", "message": f"no method {method}"}})

        def connect_hook(self, body):
            """Decides who a connection is before it opens."""
            try:
                c = json.loads(body)
            except ValueError as e:
                return self.answer(400, {"error": f"not a connection: {e}"})
            store.count("connect_hooks")
            user = c.get("userId")
            if user is None:
                # connect_auth = backend: the token is one of our sessions
                # (a real backend would look it up; here `sess-USER`).
                token = c.get("token") or ""
                if not token.startswith("sess-") or len(token) == len("sess-"):
                    return self.answer(200, {"result": "reject", "reason": "unknown session"})
                user = token[len("sess-"):]
            # For the tests: a slow backend, and a failing one.
            if user.startswith("slow"):
                time.sleep(1.5)
            if user.startswith("fail"):
                return self.answer(500, {"error": "the backend failed"})
            if user.startswith("suspended"):
                return self.answer(200, {"result": "reject", "reason": "account suspended", "code": "forbidden"})
            return self.answer(200, {
                "result": "allow",
                "userId": user,
                "roles": ["moderator"] if user.startswith("mod-") else [],
                "channels": ["*"],
                "subscribe": ["lobby", f"inbox-{user}"],
            })

        def publish_hook(self, body):
            """Decides about a message before corecast sequences it."""
            try:
                m = json.loads(body)
                content = m["content"]
            except (ValueError, KeyError) as e:
                return self.answer(400, {"error": f"not a message: {e}"})
            store.count("publish_hooks")
            # For the tests: a slow backend, and a failing one.
            if content.startswith("/slow"):
                time.sleep(1.5)
            if content.startswith("/fail"):
                return self.answer(500, {"error": "the backend failed"})
            if BLOCKED & set(content.lower().split()):
                return self.answer(200, {"result": "reject", "reason": "that word is not allowed here"})
            links = [w for w in content.split() if w.startswith(("http://", "https://"))]
            if links:
                # Metadata the clients show (a real backend would fetch
                # each page's title for a preview).
                return self.answer(200, {"result": "rewrite", "meta": {"links": links}})
            if content.startswith("/shout "):
                return self.answer(200, {"result": "rewrite", "content": content[len("/shout "):].upper()})
            self.answer(200, {"result": "allow"})

        def do_GET(self):
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path == "/messages":
                rows = store.query(
                    "SELECT message_id, user_id, content, sent_at, edited_at, reactions "
                    "FROM messages WHERE channel = ? ORDER BY sent_at, message_id",
                    (q.get("channel", [""])[0],),
                )
                keys = ("messageId", "userId", "content", "sentAt", "editedAt", "reactions")
                out = [dict(zip(keys, r)) for r in rows]
                for m in out:
                    m["reactions"] = json.loads(m["reactions"])
                return self.answer(200, out)
            if url.path == "/events":
                rows = store.query("SELECT channel, epoch, offset, type FROM events ORDER BY seq")
                keys = ("channel", "epoch", "offset", "type")
                return self.answer(200, [dict(zip(keys, r)) for r in rows])
            if url.path == "/activity":
                rows = store.query("SELECT id, channel, type, data FROM activity ORDER BY seq")
                return self.answer(
                    200,
                    [{"id": i, "channel": c, "type": t, "data": json.loads(d)} for i, c, t, d in rows],
                )
            if url.path == "/dms":
                user = q.get("user", [""])[0]
                rows = store.query(
                    "SELECT message_id, from_user, to_user, content FROM dms "
                    "WHERE from_user = ? OR to_user = ? ORDER BY sent_at, message_id",
                    (user, user),
                )
                keys = ("messageId", "fromUserId", "toUserId", "content")
                return self.answer(200, [dict(zip(keys, r)) for r in rows])
            if url.path == "/stats":
                return self.answer(200, dict(store.query("SELECT name, value FROM stats")))
            self.answer(404, {"error": "not found"})

        def log_message(self, fmt, *args):
            pass  # quiet; errors still reach stderr

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    p.add_argument("--db", default="messages.db", help="the SQLite file")
    p.add_argument(
        "--secret",
        default=os.environ.get("CORECAST_WEBHOOK_SECRET", ""),
        help="corecast's webhook.secret [env CORECAST_WEBHOOK_SECRET]",
    )
    a = p.parse_args()
    if len(a.secret) < 16:
        sys.exit("give the webhook secret (at least 16 bytes): --secret or CORECAST_WEBHOOK_SECRET")
    server = ThreadingHTTPServer((a.host, a.port), handler(Store(a.db), a.secret.encode()))
    print(f"backend listening on {a.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
