#!/usr/bin/env python3
"""The soak's report (Tests/HIL/soak.sh): markdown on stdout, exit 1 when an event failed, a
client saw a wrong byte or an error, or a driver grew.

Growth: for each driver (blk, net, rng) and build, the median of its first three samples against
the median of its last three; descriptors and threads may not grow at all, RSS by at most 10 % +
4 MiB (allocator noise). Compared twice: within the steady phase (one process living for a third
of the run) and across the whole run (processes of the same build before and after every
upgrade, crash and reset)."""
import argparse, csv, json, math, os, re, statistics, sys

p = argparse.ArgumentParser()
p.add_argument("--minutes", type=int, required=True)
p.add_argument("--elapsed", type=int, required=True)
p.add_argument("--clients", required=True, help="nbd-clients.py's output")
p.add_argument("--fio", nargs="*", default=[], help="fio's JSON output of each run")
p.add_argument("--fio-runs", type=int, required=True)
p.add_argument("--iperf-bytes", type=int, required=True)
p.add_argument("--iperf-runs", type=int, required=True)
p.add_argument("--rng-bytes", type=int, required=True)
p.add_argument("--samples", required=True)
p.add_argument("--events", required=True)
p.add_argument("--builds", nargs="+", default=[], help="NAME=PATH of each driver build")
a = p.parse_args()
problems = []
names = {path: name for name, path in (b.split("=", 1) for b in a.builds)}


def mib(n):
    return "%.1f MiB" % (n / 1048576)


def pct(values, q):
    """Nearest-rank percentile."""
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


print("# Soak: %d minutes asked, %d s run (%s)" % (a.minutes, a.elapsed, os.uname().release))
print()
print("## Load")
print()
print("| load | figures |")
print("|---|---|")
line = open(a.clients).read().strip().splitlines()
summary = line[-1] if line else ""
m = re.match(r"clients (\d+) served (\d+) refused (\d+) requests (\d+) verified-bytes (\d+) wrong (\d+) errors (\d+) reconnects (\d+)", summary)
if not m:
    problems.append("the NBD clients gave no summary: %r" % summary)
else:
    c, served, refused, requests, verified, wrong, errors, reconnects = map(int, m.groups())
    print("| %d NBD clients of our own (4 KiB write, read back, compare; FLUSH every 16) | %d served, %d refused; %d requests; "
          "%s verified byte by byte; %d wrong bytes; %d errors; %d reconnects after crashes |"
          % (c, served, refused, requests, mib(verified), wrong, errors, reconnects))
    if served != c or wrong or errors:
        problems.append("NBD clients: %s" % summary)
written = verified = 0
for path in a.fio:
    try:
        text = open(path, errors="replace").read()
        # fio may print notes before its JSON document.
        job = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]["jobs"][0]
        written += job["write"]["io_bytes"]
        verified += job["read"]["io_bytes"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        problems.append("fio output %s: %s" % (os.path.basename(path), e))
if a.fio and verified == 0:
    problems.append("fio verified nothing in %d runs (time-based runs verify only with verify_backlog)" % len(a.fio))
print("| fio on ext4 over the kernel NBD client (4 KiB random writes, iodepth 8, crc32c verify of every 64 blocks written) | %d runs; %s written, %s read back and verified |"
      % (a.fio_runs, mib(written), mib(verified)))
print("| iperf3 TCP, 4 streams, through serve net | %d runs; %s received |" % (a.iperf_runs, mib(a.iperf_bytes)))
print("| serve rng into the kernel pool (65536 B/s at most) | %d bytes fed |" % a.rng_bytes)

events = list(csv.DictReader(open(a.events)))
print()
print("## Events")
print()
print("| event | count | failed | how |")
print("|---|---|---|---|")
def row(title, rows, how):
    bad = [r for r in rows if r["result"] != "ok"]
    print("| %s | %d | %d | %s |" % (title, len(rows), len(bad), how))
    for r in bad:
        problems.append("%s at %s s failed: %s" % (r["kind"], r["seconds"], r))
for target in ("blk", "net"):
    rows = [r for r in events if r["kind"] == "upgrade" and r["target"] == target]
    combos = {}
    for r in rows:
        k = "%s %s->%s (%s)" % (r["requested"], r["from"], r["to"], r["effective"] or "?")
        combos[k] = combos.get(k, 0) + 1
    row("hot upgrade of %s" % target, rows, ", ".join("%s x%d" % kv for kv in sorted(combos.items())))
crashes = [r for r in events if r["kind"] == "crash"]
row("kill -9 of the blk driver, restarted by systemd", crashes,
    ", ".join("%s x%d" % (h, sum(1 for r in crashes if r["effective"] == h)) for h in sorted({r["effective"] for r in crashes})))
bursts = [r for r in events if r["kind"] == "resets"]
row("device resets of the rng (reset + renegotiate)", bursts,
    "%d resets in %d bursts" % (sum(int(r["requested"] or 0) for r in bursts if r["result"] == "ok"), len(bursts)))

print()
print("## Gaps (ms)")
print()
print("| gap | n | p50 | p99 | max |")
print("|---|---|---|---|---|")
def gaps(title, rows, field):
    v = [float(r[field]) for r in rows if r.get(field) not in (None, "")]
    if v:
        print("| %s | %d | %.1f | %.1f | %.1f |" % (title, len(v), pct(v, 50), pct(v, 99), max(v)))
up = lambda t: [r for r in events if r["kind"] == "upgrade" and r["target"] == t and r["result"] == "ok"]
gaps("blk upgrade, longest wait of a reader on /dev/nbd0", up("blk"), "client_gap_ms")
gaps("blk upgrade, the driver's service gap", up("blk"), "driver_gap_ms")
gaps("net upgrade, the driver's service gap", up("net"), "driver_gap_ms")
ok = [r for r in crashes if r["result"] == "ok"]
gaps("crash, longest wait of a reader on /dev/nbd0", ok, "client_gap_ms")
gaps("crash, kill -9 to the restarted driver active", ok, "driver_gap_ms")
gaps("100 rng resets, whole burst", [r for r in bursts if r["result"] == "ok"], "driver_gap_ms")

samples = list(csv.DictReader(open(a.samples)))
print()
print("## The drivers over the run (from /proc every few seconds)")
print()
print("| driver | build | scope | samples | RSS first / last / max | fds first / last / max | threads first / last / max | growth |")
print("|---|---|---|---|---|---|---|---|")
def med(rows, key):
    return statistics.median(int(r[key]) for r in rows)
def judge(kind, build, scope, rows):
    if len(rows) < 6:
        print("| %s | %s | %s | %d | | | | too few samples to judge |" % (kind, build, scope, len(rows)))
        return
    first, last = rows[:3], rows[-3:]
    f = {k: med(first, k) for k in ("rss_kib", "fds", "threads")}
    l = {k: med(last, k) for k in ("rss_kib", "fds", "threads")}
    mx = {k: max(int(r[k]) for r in rows) for k in ("rss_kib", "fds", "threads")}
    grew = []
    if l["fds"] > f["fds"]:
        grew.append("fds %g -> %g" % (f["fds"], l["fds"]))
    if l["threads"] > f["threads"]:
        grew.append("threads %g -> %g" % (f["threads"], l["threads"]))
    if l["rss_kib"] > f["rss_kib"] * 1.10 + 4096:
        grew.append("RSS %g -> %g KiB" % (f["rss_kib"], l["rss_kib"]))
    verdict = "grew: " + ", ".join(grew) if grew else "none"
    print("| %s | %s | %s | %d | %s / %s / %s | %g / %g / %d | %g / %g / %d | %s |" % (
        kind, build, scope, len(rows), mib(f["rss_kib"] * 1024), mib(l["rss_kib"] * 1024), mib(mx["rss_kib"] * 1024),
        f["fds"], l["fds"], mx["fds"], f["threads"], l["threads"], mx["threads"], verdict))
    if grew:
        problems.append("%s (%s, %s) %s" % (kind, build, scope, verdict))
for kind in ("blk", "net", "rng"):
    mine = [r for r in samples if r["driver"] == kind]
    steady = [r for r in mine if r["phase"] == "steady"]
    if steady:
        pid = steady[0]["pid"]
        judge(kind, names.get(steady[0]["exe"], steady[0]["exe"]), "steady phase, pid %s" % pid, [r for r in steady if r["pid"] == pid])
    for exe in sorted({r["exe"] for r in mine}):
        rows = [r for r in mine if r["exe"] == exe]
        judge(kind, names.get(exe, exe), "whole run, %d processes" % len({r["pid"] for r in rows}), rows)

print()
if problems:
    print("## Problems")
    print()
    for x in problems:
        print("- " + x)
    sys.exit(1)
print("No problem: every event succeeded, every byte verified, no driver grew.")
