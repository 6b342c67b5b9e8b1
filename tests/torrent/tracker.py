#!/usr/bin/python3
"""A tiny HTTP BitTorrent tracker for the network lab (BEP 3 announces with
compact peer lists, BEP 23). It keeps every peer it has heard from and hands
each announcer up to `numwant` others at random.

  tracker.py --ip IP --port PORT

Prints "ready" once it listens. The listen backlog is raised well above
http.server's 5: a flash crowd announces all at once.
"""

import argparse
import random
import socket
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import libtorrent as lt

INTERVAL = 30
swarms = {}
lock = threading.Lock()


class Announce(BaseHTTPRequestHandler):
    def do_GET(self):
        q = parse_qs(urlparse(self.path).query, encoding="latin-1")
        try:
            info_hash = q["info_hash"][0]
            port = int(q["port"][0])
        except (KeyError, ValueError):
            return self.reply({"failure reason": "info_hash and port required"})
        want = int(q.get("numwant", ["50"])[0])
        me = (self.client_address[0], port)
        with lock:
            peers = swarms.setdefault(info_hash, set())
            if q.get("event", [""])[0] == "stopped":
                peers.discard(me)
            else:
                peers.add(me)
            others = [p for p in peers if p != me]
        random.shuffle(others)
        compact = b"".join(
            socket.inet_aton(ip) + struct.pack(">H", p) for ip, p in others[:want]
        )
        self.reply({"interval": INTERVAL, "min interval": 5, "peers": compact})

    def reply(self, body):
        data = lt.bencode(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 512
    daemon_threads = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    server = Server((args.ip, args.port), Announce)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
