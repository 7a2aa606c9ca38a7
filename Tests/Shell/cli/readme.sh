#!/usr/bin/env bash
# ok and bad always succeed, so `test && ok || bad` is an if-then-else here; the README line
# below is printf's format, not an expansion.
# shellcheck disable=SC2015,SC2016
#
# The README's virtio-vfio command lines parse with the real binary: every synopsis in its
# tables and every command in its code blocks, as Tests/Shell/cli/readme-commands extracts them
# (optional parts left out and put in, each alternative, placeholders such as BDF, N, PATH
# replaced by sample values: its --help lists them), run with VIRTIO_VFIO_PARSE_ONLY=1 so that
# they are parsed and validated but never run (no device is touched; no VFIO needed). The
# binary must name the subcommand the line starts with, and every subcommand of the binary must
# be documented by at least one line. Checks of the check itself: the table's old form
# `blk BDF id` is refused, a bare "..." in a synopsis is reported, parse-only runs nothing.
#
# Usage: Tests/Shell/cli/readme.sh [README]     prints "readme: N passed, N failed"; exit 1 on failure
set -uo pipefail
HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd -- "$HERE/../../.." && pwd)
README=${1:-$REPO/README.md}
bin=$REPO/.build/debug/virtio-vfio
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/readme-test.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT

# parse WORD...: the binary in parse-only mode on a command line (without "virtio-vfio").
parse() {
  OUT=$(VIRTIO_VFIO_PARSE_ONLY=1 "$bin" "$@" 2>"$WORK/err"); RC=$?
  ERR=$(<"$WORK/err")
}

"$HERE/readme-commands" "$README" >"$WORK/commands" 2>"$WORK/problems"
rc=$?
while IFS= read -r problem; do bad "not a command line: $problem"; done <"$WORK/problems"
[[ $rc == 0 || -s $WORK/problems ]] || bad "readme-commands exited $rc"
count=$(wc -l <"$WORK/commands")
((count >= 20)) && ok "$count command lines from $(basename "$README")" || bad "only $count command lines found in $README"

declare -A documented=()
while IFS=$'\t' read -r line synopsis quoted; do
  eval "words=($quoted)"
  # shellcheck disable=SC2154 # words is set by the eval
  args=("${words[@]:1}")
  parse "${args[@]}"
  if [[ " ${args[*]} " == *" --version "* || " ${args[*]} " == *" --help "* ]]; then
    # Answered while parsing (ArgumentParser prints them), in parse-only mode too.
    [[ $RC == 0 && -n $OUT ]] && ok "README:$line: $quoted" || bad "README:$line: \`$quoted\`: exit $RC: ${ERR%%$'\n'*}"
    continue
  fi
  if [[ $RC != 0 || $OUT != "parsed: virtio-vfio"* ]]; then
    bad "README:$line: \`$synopsis\` as \`$quoted\`: exit $RC: ${ERR%%$'\n'*}"
    continue
  fi
  # The parsed subcommand must be the words the line starts with.
  read -ra path <<<"${OUT#parsed: virtio-vfio}"
  if [[ "${path[*]}" != "${args[*]:0:${#path[@]}}" ]]; then
    bad "README:$line: \`$quoted\` parsed as '${path[*]}'"
    continue
  fi
  documented[${path[*]}]=1
  ok "README:$line: $quoted"
done <"$WORK/commands"

# Every subcommand of the binary (from its own description of itself) is documented.
mapfile -t leaves < <("$bin" --experimental-dump-help | python3 -c '
import json, sys
def walk(command, path):
    subcommands = [s for s in command.get("subcommands") or [] if s.get("shouldDisplay", True)]
    if not subcommands and path and path != ["help"]:
        print(" ".join(path))
    for s in subcommands:
        walk(s, path + [s["commandName"]])
walk(json.load(sys.stdin)["command"], [])')
((${#leaves[@]} >= 10)) || bad "the binary describes only ${#leaves[@]} subcommands"
missing=()
for leaf in "${leaves[@]}"; do [[ -n ${documented[$leaf]:-} ]] || missing+=("$leaf"); done
((${#missing[@]} == 0)) && ok "every subcommand (${#leaves[@]}) has a documented command line that parses" \
  || bad "subcommands with no README command line that parses: ${missing[*]}"

# ---------------------------------------------------------------- the check itself
parse blk 0000:00:05.0 id
[[ $RC == 64 && $ERR == "virtio-vfio: error: 2 unexpected arguments"* ]] && ok "the old table form 'blk BDF id' is refused (exit 64)" \
  || bad "'blk BDF id': exit $RC: $ERR"
printf '| `virtio-vfio blk BDF read\\|write\\|flush\\|id ...` | old |\n' >"$WORK/old.md"
"$HERE/readme-commands" "$WORK/old.md" >/dev/null 2>"$WORK/err"; rc=$?
[[ $rc == 1 && $(<"$WORK/err") == *"old.md:1:"*"bare '...'"* ]] && ok "a bare '...' in a synopsis is reported with its line" \
  || bad "readme-commands on a bare '...': exit $rc: $(<"$WORK/err")"
parse reset ffff:ff:1f.7 --cycles 3
[[ $RC == 0 && $OUT == "parsed: virtio-vfio reset" && -z $ERR ]] && ok "parse-only names the command and runs nothing (no such device, exit 0)" \
  || bad "parse-only reset: exit $RC: $OUT $ERR"
OUT=$(VIRTIO_VFIO_PARSE_ONLY=0 "$bin" list 2>&1); RC=$?
[[ $RC == 0 && $OUT == ADDRESS* ]] && ok "VIRTIO_VFIO_PARSE_ONLY=0 runs the command" || bad "VIRTIO_VFIO_PARSE_ONLY=0 list: exit $RC: $OUT"
[[ $("$bin" --help) != *PARSE_ONLY* ]] && ok "parse-only is not in --help" || bad "--help mentions PARSE_ONLY"
[[ $(<"$REPO/README.md") == *VIRTIO_VFIO_PARSE_ONLY=1* ]] && ok "parse-only is documented in README.md" || bad "README.md does not document VIRTIO_VFIO_PARSE_ONLY"

echo "readme: $passed passed, $failed failed"
((failed == 0))
