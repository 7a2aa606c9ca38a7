#!/usr/bin/env python3
"""JUnit XML from the output of the HIL suites (and of tools/test's stages).

Usage: junit.py --out FILE [--suite NAME] LOG...

Every check of a suite prints one line: "ok   WHAT", "FAIL WHAT" or "skip WHAT"
(Tests/HIL/lib.sh; "PASS"/"FAIL:" as tools/bench-ci and tools/swift-testing-results print them). Each becomes one <testcase>; a FAIL carries as its output the lines printed
since the check before it (what the failing command said) and the lines after it up to the next
check (details printed with the failure). "### NAME" lines (Tests/HIL/all.sh, tools/hil/host-run,
tools/test) start a new <testsuite> named NAME; lines before any of them belong to --suite NAME
(default: the log's file name). A suite whose summary line says more failed than its FAIL lines
show (a script that died) gets one more failed case, "NAME: the script's own result", with the
suite's last lines. Exits 1 if a log cannot be read."""
import argparse, os, re, sys
from xml.sax.saxutils import escape, quoteattr

CHECK = re.compile(r"^(ok|FAIL|skip|PASS):?\s+(.*)$")
SUMMARY = re.compile(r"(\d+) passed, (\d+) failed")
# Characters XML 1.0 cannot carry (a console may print them).
INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def clean(text):
    return INVALID.sub("?", text)


def parse(lines, default):
    suites = []
    current = {"name": default, "cases": [], "lines": []}
    pending = []  # lines since the last check

    def close():
        if current["cases"] or current["lines"]:
            suites.append(current)

    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith("### "):
            close()
            current = {"name": line[4:].strip(), "cases": [], "lines": []}
            pending = []
            continue
        current["lines"].append(line)
        m = CHECK.match(line)
        if m:
            kind = {"ok": "pass", "PASS": "pass", "FAIL": "fail", "skip": "skip"}[m.group(1)]
            current["cases"].append({"name": m.group(2), "kind": kind, "before": pending, "after": []})
            pending = []
        else:
            pending.append(line)
            if current["cases"] and current["cases"][-1]["kind"] == "fail":
                current["cases"][-1]["after"].append(line)
    close()
    # Harness lines before the first "### NAME" are no suite of their own.
    if len(suites) > 1 and suites[0]["name"] == default and not suites[0]["cases"]:
        suites.pop(0)
    for s in suites:
        summaries = [SUMMARY.search(l) for l in s["lines"]]
        summaries = [m for m in summaries if m]
        shown = sum(1 for c in s["cases"] if c["kind"] == "fail")
        said = int(summaries[-1].group(2)) if summaries else None
        if said is None and not s["cases"]:
            said = 1
        if said is not None and said > shown:
            s["cases"].append({"name": "%s: the script's own result (%s)" % (
                s["name"], summaries[-1].group(0) if summaries else "no summary line"),
                "kind": "fail", "before": s["lines"][-40:], "after": []})
    return suites


def render(suites):
    out = ['<?xml version="1.0" encoding="UTF-8"?>']
    tests = sum(len(s["cases"]) for s in suites)
    failures = sum(1 for s in suites for c in s["cases"] if c["kind"] == "fail")
    skipped = sum(1 for s in suites for c in s["cases"] if c["kind"] == "skip")
    out.append('<testsuites tests="%d" failures="%d" skipped="%d">' % (tests, failures, skipped))
    for s in suites:
        f = sum(1 for c in s["cases"] if c["kind"] == "fail")
        k = sum(1 for c in s["cases"] if c["kind"] == "skip")
        out.append('  <testsuite name=%s tests="%d" failures="%d" skipped="%d">' % (
            quoteattr(clean(s["name"])), len(s["cases"]), f, k))
        seen = {}
        for c in s["cases"]:
            # Names repeat (a check run in a loop): number the repeats so each case is its own.
            n = seen.get(c["name"], 0) + 1
            seen[c["name"]] = n
            name = c["name"] if n == 1 else "%s (#%d)" % (c["name"], n)
            attrs = 'classname=%s name=%s' % (quoteattr(clean(s["name"])), quoteattr(clean(name)))
            if c["kind"] == "pass":
                out.append("    <testcase %s/>" % attrs)
            elif c["kind"] == "skip":
                out.append("    <testcase %s><skipped message=%s/></testcase>" % (attrs, quoteattr(clean(c["name"]))))
            else:
                text = "\n".join(c["before"] + ["FAIL " + c["name"]] + c["after"])
                out.append("    <testcase %s><failure message=%s>%s</failure></testcase>" % (
                    attrs, quoteattr(clean(c["name"][:500])), escape(clean(text))))
        out.append("  </testsuite>")
    out.append("</testsuites>")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description="JUnit XML from HIL suite output")
    p.add_argument("--out", required=True)
    p.add_argument("--suite", help="name of the suite before the first ### line")
    p.add_argument("logs", nargs="+")
    a = p.parse_args()
    suites = []
    for log in a.logs:
        try:
            with open(log, errors="replace") as f:
                suites += parse(f, a.suite or os.path.basename(log))
        except OSError as e:
            print("junit.py: cannot read %s: %s" % (log, e.strerror), file=sys.stderr)
            return 1
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(render(suites))
    os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
