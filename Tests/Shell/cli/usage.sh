#!/usr/bin/env bash
# ok and bad always succeed, so `test && ok || bad` is an if-then-else here.
# shellcheck disable=SC2015
#
# virtio-vfio's command line without a device: one error style and the --mode option.
#  - every error is one "virtio-vfio: error: ..." line first (ArgumentParser's usage errors
#    included, then its usage lines), never "Error: ..."; usage errors exit 64;
#  - --mode of `serve --take-over` and `upgrade` takes reset, live and auto by name (not the
#    wire format's 1, 2, 3), lists them in help, and refuses anything else naming them.
# Nothing is run against a device: usage errors stop before, and accepted command lines are
# only parsed (VIRTIO_VFIO_PARSE_ONLY=1).
#
# Usage: Tests/Shell/cli/usage.sh     prints "usage: N passed, N failed"; exit 1 on failure
set -uo pipefail
cd "$(dirname "$0")/../../.." || exit 1
bin=.build/debug/virtio-vfio
passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
err=$(mktemp)
trap 'rm -f "$err"' EXIT
# run ARGS...: OUT, ERR, RC of the binary.
run() { OUT=$("$bin" "$@" 2>"$err"); RC=$?; ERR=$(<"$err"); }
bdf=ffff:ff:1f.7 # no such function anywhere: nothing below may reach a device

# ---------------------------------------------------------------- one error style
usage_errors=(
  "nosuch"                                      # unknown subcommand
  "info"                                        # missing argument
  "list --bogus"                                # unknown option
  "blk $bdf id"                                 # arguments in the wrong place
  "reset $bdf --cycles 0"                       # a ValidationError from validate()
  "reset $bdf --cycles many"                    # a value of the wrong type
  "reset $bdf --function --queue 0"             # two kinds of reset at once
  "serve net $bdf --tap a:b"                    # validate() of a serve command
  "serve blk $bdf --nbd unix:/tmp/x --mode 2"   # a raw mode value
  "upgrade $bdf --binary /bin/true --mode bogus"
)
for args in "${usage_errors[@]}"; do
  # shellcheck disable=SC2086 # each entry is a list of arguments
  run $args
  first=${ERR%%$'\n'*}
  if [[ $RC == 64 && $first == "virtio-vfio: error: "?* && $ERR != *"Error: "* && -z $OUT ]]; then
    ok "'$args': exit 64, first line '$first'"
  else
    bad "'$args': exit $RC, stdout '$OUT', stderr: $ERR"
  fi
done
# ---------------------------------------------------------------- the servers' limits, refused by name
limits=(
  "serve net $bdf --tap t0 --batch 0|--batch must be 1 to 1024 frames"
  "serve net $bdf --tap t0 --batch 1025|--batch must be 1 to 1024 frames"
  "serve blk $bdf --nbd unix:/tmp/x --max-clients 0|--max-clients"
  "serve blk $bdf --nbd unix:/tmp/x --max-clients 4097|--max-clients"
  "serve blk $bdf --nbd unix:/tmp/x --requests-per-client 1025|--requests-per-client"
  "serve rng $bdf --rate 0|--rate must be positive"
  "bench blk $bdf --qd 1 32769|--qd values must be 1 to 32768"
  "bench blk $bdf --qd 0|--qd values must be 1 to 32768"
)
for entry in "${limits[@]}"; do
  # shellcheck disable=SC2086 # a list of arguments
  run ${entry%%|*}
  [[ $RC == 64 && $ERR == "virtio-vfio: error: "*"${entry#*|}"* ]] && ok "'${entry%%|*}': exit 64, names ${entry#*|}" \
    || bad "'${entry%%|*}': exit $RC: $ERR"
done
OUT=$(VIRTIO_VFIO_PARSE_ONLY=1 "$bin" serve net "$bdf" --tap t0 --batch 256 2>&1); RC=$?
[[ $RC == 0 ]] && ok "serve net --batch 256 parses" || bad "serve net --batch 256: exit $RC: $OUT"
OUT=$(VIRTIO_VFIO_PARSE_ONLY=1 "$bin" bench blk "$bdf" --qd 1 1024 32768 2>&1); RC=$?
[[ $RC == 0 ]] && ok "bench blk --qd 1 1024 32768 parses (deeper than the default queue)" || bad "bench blk --qd 1024: exit $RC: $OUT"
run info
[[ $ERR == *$'\n'"Usage: virtio-vfio info"* ]] && ok "a usage error is followed by the command's usage line" || bad "no usage line after the error: $ERR"
run "$bdf"
[[ $RC == 64 && $ERR == "virtio-vfio: error: "* ]] && ok "a BDF without a subcommand is a usage error in the same style" || bad "'$bdf': exit $RC: $ERR"
# An error of the driver (run, not parsed): the same style, its own exit code.
run reset "$bdf"
[[ $RC != 0 && $RC != 64 && $ERR == "virtio-vfio: error: "* && $ERR != *"Error: "* ]] \
  && ok "a driver error: 'virtio-vfio: error: ...', exit $RC" || bad "reset $bdf: exit $RC: $ERR"
# Help, version and completion scripts still go to stdout with exit 0.
for args in "--help" "--version" "serve blk --help" "help upgrade" "--generate-completion-script bash"; do
  # shellcheck disable=SC2086 # each entry is a list of arguments
  run $args
  [[ $RC == 0 && -n $OUT && -z $ERR ]] && ok "'$args': stdout, exit 0" || bad "'$args': exit $RC, stderr: $ERR"
done

# ---------------------------------------------------------------- --mode by name
for cmd in "serve rng" "serve blk" "serve net"; do
  # shellcheck disable=SC2086 # cmd is two words
  run $cmd --help
  [[ $OUT == *"(values: reset, live, auto; default: auto)"* ]] && ok "$cmd --help: --mode (values: reset, live, auto; default: auto)" \
    || bad "$cmd --help: $(grep -A4 -- '--mode' <<<"$OUT")"
done
run upgrade --help
[[ $OUT == *"(values: reset, live, auto; default: auto)"* ]] && ok "upgrade --help: --mode (values: reset, live, auto; default: auto)" \
  || bad "upgrade --help: $(grep -A4 -- '--mode' <<<"$OUT")"
for mode in reset live auto; do
  OUT=$(VIRTIO_VFIO_PARSE_ONLY=1 "$bin" serve blk "$bdf" --nbd unix:/tmp/x --take-over --mode "$mode" 2>&1); RC=$?
  [[ $RC == 0 && $OUT == "parsed: virtio-vfio serve blk" ]] && ok "serve blk --take-over --mode $mode parses" || bad "serve --mode $mode: exit $RC: $OUT"
  OUT=$(VIRTIO_VFIO_PARSE_ONLY=1 "$bin" upgrade "$bdf" --binary /bin/true --mode "$mode" 2>&1); RC=$?
  [[ $RC == 0 && $OUT == "parsed: virtio-vfio upgrade" ]] && ok "upgrade --mode $mode parses" || bad "upgrade --mode $mode: exit $RC: $OUT"
done
for cmd in "serve blk $bdf --nbd unix:/tmp/x --take-over" "upgrade $bdf --binary /bin/true"; do
  for value in bogus 3; do
    # shellcheck disable=SC2086 # cmd is a list of arguments
    run $cmd --mode "$value"
    [[ $RC == 64 && $ERR == "virtio-vfio: error: The value '$value' is invalid for '--mode <mode>'. Please provide one of 'reset', 'live' or 'auto'."* ]] \
      && ok "${cmd%% "$bdf"*} --mode $value refused with the names" || bad "${cmd%% "$bdf"*} --mode $value: exit $RC: $ERR"
  done
done
# The completions offer the names: all four --mode options, in bash's completion script.
run --generate-completion-script bash
modes=$(grep -c -F "__virtio-vfio_add_completions -W 'reset'\$'\\n''live'\$'\\n''auto'" <<<"$OUT")
[[ $modes == 4 && $OUT != *"'1'\$'\\n''2'"* ]] && ok "the bash completion offers reset, live, auto for every --mode ($modes)" \
  || bad "the bash completion offers the mode names for $modes of 4 --mode options"

echo "usage: $passed passed, $failed failed"
((failed == 0))
