#!/usr/bin/python3
"""One libtorrent peer in the network lab: the anchor our swarm is measured
against (tests/src/torrent.rs drives it, one process per lab host).

  peer.py make --data FILE --tracker URL --out TORRENT
  peer.py seed  --torrent T --save DIR --ip IP
  peer.py leech --torrent T --save DIR --ip IP --seed IP

A peer prints "ready" once its session listens. A seed adds its torrent at
once; a leecher waits for a line "go" on stdin, adds the torrent (as a
client's "add" does: started, not queued), is handed the seed's address (as
our downloaders are handed a bootstrap address) and prints "done SECONDS"
when it holds every verified piece. Every peer keeps serving until stdin
closes, then prints "stats JSON" (payload bytes up and down) and exits.

Settings are libtorrent's defaults but for what a lab must turn off: DHT,
local discovery, UPnP and NAT-PMP (the lab has none of them to offer).
"""

import argparse
import json
import os
import sys
import threading
import time

import libtorrent as lt

PORT = 6881
PIECE = 256 * 1024  # the size of our blocks


def make(args):
    fs = lt.file_storage()
    lt.add_files(fs, args.data)
    ct = lt.create_torrent(fs, PIECE)
    ct.add_tracker(args.tracker)
    ct.set_creator("p2pvm lab")
    lt.set_piece_hashes(ct, os.path.dirname(os.path.abspath(args.data)))
    with open(args.out, "wb") as f:
        f.write(lt.bencode(ct.generate()))


def session(ip):
    return lt.session(
        {
            "listen_interfaces": f"{ip}:{PORT}",
            "outgoing_interfaces": ip,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "alert_mask": lt.alert.category_t.error_notification,
        }
    )


def add(ses, args, seed):
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(args.torrent)
    atp.save_path = args.save
    atp.flags &= ~(lt.torrent_flags.paused | lt.torrent_flags.auto_managed)
    if seed:
        atp.flags |= lt.torrent_flags.seed_mode
    return ses.add_torrent(atp)


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def serve(args, seed):
    ses = session(args.ip)
    handle = add(ses, args, seed) if seed else None
    say("ready")
    stdin_closed = threading.Event()
    go = threading.Event()

    def read_stdin():
        for line in sys.stdin:
            if line.strip() == "go":
                go.set()
        stdin_closed.set()
        go.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    if not seed:
        go.wait()
        if stdin_closed.is_set():
            return
        start = time.monotonic()
        handle = add(ses, args, seed)
        handle.connect_peer((args.seed, PORT))
        while not stdin_closed.is_set():
            s = handle.status()
            if s.is_seeding:
                say(f"done {time.monotonic() - start:.3f}")
                break
            for a in ses.pop_alerts():
                if a.category() & lt.alert.category_t.error_notification:
                    sys.stderr.write(f"libtorrent: {a.message()}\n")
            time.sleep(0.05)
    stdin_closed.wait()
    s = handle.status()
    say(
        "stats "
        + json.dumps(
            {
                "uploaded": s.total_payload_upload,
                "downloaded": s.total_payload_download,
                "seeding": s.is_seeding,
            }
        )
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["make", "seed", "leech"])
    p.add_argument("--data")
    p.add_argument("--tracker")
    p.add_argument("--out")
    p.add_argument("--torrent")
    p.add_argument("--save")
    p.add_argument("--ip")
    p.add_argument("--seed")
    args = p.parse_args()
    if args.role == "make":
        make(args)
    else:
        serve(args, args.role == "seed")


if __name__ == "__main__":
    main()
