#!/usr/bin/env python3
"""Reads a block device with O_DIRECT 4 KiB reads, one at a time, and records the longest gap
between two completions. SIGUSR1 prints 'gap-ms N' for the window since the last SIGUSR1 and
starts a new window; SIGTERM prints the window and exits. Errors are counted ('errors N'). Writes 'ready' to
OUTFILE once the signal handlers are in place.
Usage: gap-probe.py DEVICE OUTFILE"""
import mmap, os, signal, sys, time

device, out = sys.argv[1], sys.argv[2]
fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
size = os.lseek(fd, 0, os.SEEK_END)
buf = mmap.mmap(-1, 4096)
state = {"max": 0.0, "errors": 0, "reads": 0}

def report(final):
    with open(out, "a") as f:
        f.write("gap-ms %.3f reads %d errors %d\n" % (state["max"] * 1000, state["reads"], state["errors"]))
    state["max"] = 0.0
    state["reads"] = 0
    if final:
        sys.exit(0)

signal.signal(signal.SIGUSR1, lambda *_: report(False))
signal.signal(signal.SIGTERM, lambda *_: report(True))
with open(out, "a") as f:
    f.write("ready\n")
last = time.monotonic()
offset = 0
while True:
    try:
        os.preadv(fd, [buf], offset)
        state["reads"] += 1
    except OSError:
        state["errors"] += 1
        time.sleep(0.001)
    now = time.monotonic()
    state["max"] = max(state["max"], now - last)
    last = now
    offset = (offset + 4096 * 7919) % (size - 4096) // 4096 * 4096
