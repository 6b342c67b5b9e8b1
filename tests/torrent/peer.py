#!/usr/bin/python3
"""One libtorrent peer in the network lab: the anchor our swarm is measured
against (tests/src/torrent.rs drives it, one process per lab host).

  peer.py make --data FILE --tracker URL --out TORRENT
  peer.py seed  --torrent T --save DIR --ip IP
  peer.py leech --torrent T --save DIR --ip IP --seed IP

A peer prints "ready" once its session listens. A seed adds its torrent at
once; a leecher waits for a command on stdin:

  go                       adds the torrent (as a client's "add" does:
                           started, not queued), is handed the seed's address
                           (as our downloaders are handed a bootstrap
                           address) and prints "done SECONDS" when it holds
                           every verified piece.
  view OFFSET LENGTH RATE  plays [OFFSET, OFFSET + LENGTH) as a stream at RATE
                           bytes a second: the torrent in sequential mode (added
                           if it is not yet), pieces before OFFSET it does not
                           hold left out (a seek), and the pieces of the first
                           second of media given deadlines (time-critical, as
                           streaming clients ask); prints "got SECONDS BYTES"
                           whenever the bytes held in a row from OFFSET grow,
                           then "viewed".

Every peer keeps serving until stdin closes, then prints "stats JSON" (payload
bytes up and down) and exits.

Settings are libtorrent's defaults but for what a lab must turn off: DHT,
local discovery, UPnP and NAT-PMP (the lab has none of them to offer).
"""

import argparse
import json
import os
import queue
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


def read_commands():
    """Commands from stdin on a queue; None once stdin closes."""
    commands = queue.Queue()

    def read():
        for line in sys.stdin:
            commands.put(line.split())
        commands.put(None)

    threading.Thread(target=read, daemon=True).start()
    return commands


def report_errors(ses):
    for a in ses.pop_alerts():
        if a.category() & lt.alert.category_t.error_notification:
            sys.stderr.write(f"libtorrent: {a.message()}\n")


def held_from(handle, offset, length):
    """Bytes held in a row from offset, at most length."""
    end = offset + length
    k = offset // PIECE
    while k * PIECE < end and handle.have_piece(k):
        k += 1
    return max(0, min(k * PIECE, end) - offset)


def view(ses, handle, offset, length, rate, closed):
    start = time.monotonic()
    handle.set_flags(lt.torrent_flags.sequential_download)
    first = offset // PIECE
    prios = handle.get_piece_priorities()
    for k in range(first):
        if not handle.have_piece(k):
            prios[k] = 0
    handle.prioritize_pieces(prios)
    prebuffer_end = min(offset + max(int(rate), 1), offset + length)
    k = first
    while k * PIECE < prebuffer_end:
        handle.set_piece_deadline(k, int((k * PIECE - offset) * 1000 / rate) if k > first else 0)
        k += 1
    said = 0
    while not closed():
        got = held_from(handle, offset, length)
        if got > said:
            say(f"got {time.monotonic() - start:.3f} {got}")
            said = got
        if got >= length:
            say("viewed")
            return
        report_errors(ses)
        time.sleep(0.02)


def serve(args, seed):
    ses = session(args.ip)
    handle = add(ses, args, seed) if seed else None
    say("ready")
    commands = read_commands()
    closed = threading.Event()

    def stdin_closed():
        # A command that came in the meantime waits for its turn.
        if closed.is_set():
            return True
        try:
            c = commands.get_nowait()
        except queue.Empty:
            return False
        if c is None:
            closed.set()
        else:
            pending.append(c)
        return closed.is_set()

    pending = []
    while not closed.is_set():
        c = pending.pop(0) if pending else commands.get()
        if c is None:
            break
        if seed or not c:
            continue
        start = time.monotonic()
        if handle is None:
            handle = add(ses, args, seed)
            handle.connect_peer((args.seed, PORT))
        if c[0] == "go":
            while not stdin_closed():
                if handle.status().is_seeding:
                    say(f"done {time.monotonic() - start:.3f}")
                    break
                report_errors(ses)
                time.sleep(0.05)
        elif c[0] == "view" and len(c) == 4:
            view(ses, handle, int(c[1]), int(c[2]), float(c[3]), stdin_closed)
    if handle is None:
        return
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
