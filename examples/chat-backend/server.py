#!/usr/bin/env python3
"""A tiny chat backend for Switchboard's publish proxy (Python 3 stdlib only).

POST /publish   the publish proxy (--proxy-publish-url http://HOST:PORT/publish):
                checks a chat message, stamps it, appends it to a JSON-lines file
                and answers with the stamped data, which is what Switchboard
                stores and fans out. Empty or over-long messages are refused.
POST /subscribe the subscribe proxy: allows every subscription.
GET  /messages?channel=chat:lobby&limit=50
                the persisted messages of a channel, oldest first (CORS: *).

    python3 server.py --port 9100 --file chat.jsonl

See README.md in this folder for running it with the demo chat.
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MAX_TEXT = 500
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    store = "chat.jsonl"

    def reply(self, status, body):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            call = json.loads(self.rfile.read(length))
        except ValueError:
            return self.reply(400, {"error": {"code": "bad_request", "message": "not JSON"}})
        if self.path == "/subscribe":
            return self.reply(200, {"result": {}})
        if self.path != "/publish":
            return self.reply(404, {})
        data = call.get("data")
        text = data.get("text") if isinstance(data, dict) else None
        if not isinstance(text, str) or not text.strip():
            return self.reply(200, {"error": {"code": "empty_message", "message": "say something"}})
        if len(text) > MAX_TEXT:
            return self.reply(200, {"error": {"code": "too_long", "message": f"at most {MAX_TEXT} characters"}})
        stamped = {"text": text.strip(), "time": int(time.time() * 1000)}
        if isinstance(data.get("name"), str) and data["name"].strip():
            stamped["name"] = data["name"].strip()[:40]
        record = {"channel": call.get("channel"), "clientId": call.get("clientId"),
                  "userId": call.get("userId"), "data": stamped}
        with LOCK, open(self.store, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.reply(200, {"result": {"data": stamped}})

    def do_GET(self):
        url = urlparse(self.path)
        if url.path != "/messages":
            return self.reply(404, {})
        query = parse_qs(url.query)
        channel = query.get("channel", [""])[0]
        limit = max(1, min(int(query.get("limit", ["50"])[0] or 50), 1000))
        messages = []
        with LOCK:
            try:
                with open(self.store, encoding="utf-8") as f:
                    for line in f:
                        record = json.loads(line)
                        if record["channel"] == channel:
                            messages.append(record)
            except FileNotFoundError:
                pass
        self.reply(200, {"channel": channel, "messages": messages[-limit:]})

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--file", default="chat.jsonl", help="JSON-lines file the messages go to")
    args = parser.parse_args()
    Handler.store = args.file
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"chat backend on http://{args.host}:{args.port}, messages in {args.file}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
