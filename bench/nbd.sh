#!/usr/bin/env bash
# NBD serving benchmark: a Strata disk session over a stored version, against
# qemu-nbd (a qcow2 overlay backed by the raw base) and nbdkit's file plugin (the raw
# base itself), on the same image in one run. fio's nbd engine is the client for all
# three, over Unix sockets. A script, not a test: it prints a table and exits 0 when
# every server and every job ran.
#
# Servers (each serves the same BENCH_NBD_MB image, fresh, with no writes yet; all
# run at once, each on its own Unix socket):
#   strata    `strata import base.raw img`, `strata session create s --from img`,
#             `strata serve --socket SOCK`, export `s` (the writable session)
#   qemu-nbd  `qemu-img create -f qcow2 -b base.raw -F raw overlay.qcow2`;
#             `qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 4 -t -x img`
#   nbdkit    `nbdkit -U SOCK file FILE`: base.raw read-only for the read jobs, a
#             copy of it (writable, a second nbdkit) for the write job
# Jobs (fio --ioengine=nbd, numjobs=1, time_based, BENCH_NBD_RUNTIME s each):
#   coldread   4 KiB random reads, iodepth 16, the first job after the servers
#              start: strata's block cache is empty, so it decodes on first touch
#              (qemu-nbd and nbdkit have no such cache: same as randread) -> IOPS
#   randread   4 KiB random reads, iodepth 16                    -> IOPS
#   seqread    1 MiB sequential reads, iodepth 4                 -> MB/s
#   randwrite  4 KiB random writes, iodepth 16, flush every 64   -> IOPS
# Each job runs on the three servers back to back (interleaved, the order rotating
# every round), so that load from other processes falls on all three alike. Before
# the servers start, every file they read is read once (page cache warm). The
# strata session is compared with base.raw (qemu-img compare, untimed) after
# coldread: from then on every data block is in strata's block cache.
#
# Data: a raw image of 64 KiB runs, seeded: ~35% random bytes (incompressible), ~40%
# text from /usr/share (compressible), ~25% zeros left as holes. BENCH_NBD_DATA=ext4
# makes instead an ext4 file system with `mke2fs -t ext4 -d /usr/share` (it must fit).
#
# Environment:
#   BENCH_NBD_MB        image size in MiB (default 1024)
#   BENCH_NBD_RUNTIME   seconds per fio job (default 15)
#   BENCH_NBD_ROUNDS    rounds of the randread, seqread and randwrite jobs (default 1);
#                       the table shows each server's median
#   BENCH_NBD_DATA      mix (default) or ext4
#   BENCH_DIR           work directory (default /tmp/strata-nbd-bench)
#   BENCH_KEEP=1        keep the work directory
#   STRATA_BIN          use this strata binary instead of building target/release/strata
#
# Usage: BENCH_NBD_MB=256 BENCH_NBD_RUNTIME=5 bench/nbd.sh
set -euo pipefail

SIZE_MB=${BENCH_NBD_MB:-1024}
RUNTIME=${BENCH_NBD_RUNTIME:-15}
ROUNDS=${BENCH_NBD_ROUNDS:-1}
DATA=${BENCH_NBD_DATA:-mix}
BENCH_DIR=${BENCH_DIR:-/tmp/strata-nbd-bench}
KEEP=${BENCH_KEEP:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'nbd.sh: %s\n' "$*" >&2; exit 1; }

[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 16 ]] || die "BENCH_NBD_MB must be a number >= 16"
[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -ge 1 ]] || die "BENCH_NBD_RUNTIME must be a number >= 1"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "BENCH_NBD_ROUNDS must be a number >= 1"
[[ $DATA == mix || $DATA == ext4 ]] || die "BENCH_NBD_DATA must be mix or ext4"

# ---------------------------------------------------------------- tools
export PATH="$PATH:/usr/sbin:/sbin"
install_missing() {
    local -A pkg_of=([fio]=fio [nbdkit]=nbdkit [nbdinfo]=libnbd-bin [qemu-img]=qemu-utils
        [qemu-nbd]=qemu-utils [mke2fs]=e2fsprogs [python3]=python3)
    local missing=() c
    for c in "${!pkg_of[@]}"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("${pkg_of[$c]}")
    done
    if ((${#missing[@]})); then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
            die "could not install ${missing[*]}"
    fi
    # Debian ships fio's nbd engine in the fio package itself (built with libnbd).
    fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine (fio --enghelp=nbd)"
}
install_missing

if [[ -n ${STRATA_BIN:-} ]]; then
    STRATA=$STRATA_BIN
else
    log "building strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata-cli) || die "cargo build --release failed"
    STRATA="$ROOT/target/release/strata"
fi
[[ -x $STRATA ]] || die "no strata binary at $STRATA"

# ---------------------------------------------------------------- work directory
MARK=.strata-nbd-bench
if [[ -d $BENCH_DIR && -n $(ls -A "$BENCH_DIR") && ! -e $BENCH_DIR/$MARK ]]; then
    die "$BENCH_DIR exists, is not empty and was not made by this script; set BENCH_DIR"
fi
mkdir -p "$BENCH_DIR"
touch "$BENCH_DIR/$MARK"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
W="$BENCH_DIR/work"
declare -A PID URI
stop_server() {
    local name
    for name in "${!PID[@]}"; do
        kill "${PID[$name]}" 2>/dev/null || true
        wait "${PID[$name]}" 2>/dev/null || true
        unset "PID[$name]"
    done
}
cleanup() {
    local rc=$?
    stop_server
    if [[ $KEEP == 1 ]]; then
        log "kept $BENCH_DIR"
    else
        rm -rf "$W" "${BENCH_DIR:?}/$MARK"
        rmdir "$BENCH_DIR" 2>/dev/null || true
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$W"
mkdir -p "$W"

need_mb=$((SIZE_MB * 4))
avail_mb=$(($(df -Pk "$BENCH_DIR" | awk 'NR==2 {print $4}') / 1024))
((avail_mb >= need_mb)) || die "needs about $need_mb MB free in $BENCH_DIR, has $avail_mb MB"

# ---------------------------------------------------------------- data
BASE="$W/base.raw"
if [[ $DATA == ext4 ]]; then
    log "base: mke2fs -t ext4 -d /usr/share ($SIZE_MB MiB)"
    mke2fs -q -t ext4 -F -d /usr/share "$BASE" "${SIZE_MB}M" ||
        die "mke2fs -d /usr/share failed (does /usr/share fit in $SIZE_MB MiB?)"
    DATA_DESC="ext4 (mke2fs -d /usr/share)"
else
    log "base: $SIZE_MB MiB of random, text and zero runs"
    DATA_DESC=$(python3 - "$BASE" "$SIZE_MB" <<'EOF'
import os, random, sys
path, mb = sys.argv[1], int(sys.argv[2])
B = 64 << 10
rng = random.Random(20261122)
# Text: the readable files under /usr/share/doc and /usr/share/common-licenses.
text = bytearray()
for top in ("/usr/share/common-licenses", "/usr/share/doc", "/usr/share/perl5"):
    for d, _, files in sorted(os.walk(top)):
        for f in sorted(files):
            p = os.path.join(d, f)
            if os.path.islink(p) or f.endswith(".gz"):
                continue
            try:
                text += open(p, "rb").read(1 << 20)
            except OSError:
                pass
            if len(text) >= 64 << 20:
                break
if len(text) < 1 << 20:
    text += b"".join(b"line %d of a text file that compresses well\n" % i for i in range(40000))
blocks = (mb << 20) // B
kinds = {"random": 0, "text": 0, "zero": 0}
with open(path, "wb") as out:
    out.truncate(blocks * B)
    b = 0
    while b < blocks:
        run = min(rng.randint(1, 16), blocks - b)
        r = rng.random()
        kind = "random" if r < 0.35 else "text" if r < 0.75 else "zero"
        kinds[kind] += run
        if kind != "zero":
            out.seek(b * B)
            for _ in range(run):
                if kind == "random":
                    out.write(rng.randbytes(B))
                else:
                    o = rng.randrange(0, len(text) - B)
                    out.write(bytes(text[o:o + B]))
        b += run
t = blocks / 100
print("%.0f%% random, %.0f%% text, %.0f%% zero (holes), in runs of 1-16 64 KiB blocks"
      % (kinds["random"] / t, kinds["text"] / t, kinds["zero"] / t))
EOF
    )
fi
ALLOC_MB=$(($(stat -c %b "$BASE") * $(stat -c %B "$BASE") / 1000000))

STORE="$W/store"
log "strata: init, import, session create"
"$STRATA" init "$STORE" >/dev/null
cat "$BASE" >/dev/null
t0=$(date +%s.%N)
"$STRATA" --store "$STORE" import "$BASE" img -m base >/dev/null
t1=$(date +%s.%N)
"$STRATA" --store "$STORE" session create s --from img >/dev/null
STORED_MB=$(du -sb "$STORE" | awk '{printf "%.1f", $1 / 1e6}')

log "qemu: qcow2 overlay on the raw base"
qemu-img create -q -f qcow2 -b "$BASE" -F raw "$W/overlay.qcow2"
log "nbdkit: a copy of the base for the write job"
cp --sparse=always "$BASE" "$W/copy.raw"

# ---------------------------------------------------------------- servers
# All servers run at once, each on its own socket, idle but for the job at hand: the
# jobs of one kind run back to back on each server (interleaved, in an order that
# rotates every round), so that the load other processes put on the machine falls
# on all three alike instead of on whichever server happened to run then.
SERVERS=(strata qemu nbdkit nbdkitw)

wait_socket() { # NAME
    local i
    for ((i = 0; i < 200; i++)); do
        if nbdinfo --size "${URI[$1]}" >/dev/null 2>&1; then return 0; fi
        kill -0 "${PID[$1]}" 2>/dev/null || die "$1 exited before serving (see $W/$1.err)"
        sleep 0.05
    done
    die "$1 did not start serving (${URI[$1]})"
}

start_servers() {
    local i sock
    for i in "${SERVERS[@]}"; do rm -f "$W/$i.sock"; done
    sock="$W/strata.sock"
    "$STRATA" --store "$STORE" serve --socket "$sock" >"$W/strata.out" 2>"$W/strata.err" &
    PID[strata]=$!
    URI[strata]="nbd+unix:///s?socket=$sock"
    sock="$W/qemu.sock"
    qemu-nbd -f qcow2 --socket="$sock" --cache=writeback --aio=threads -e 4 -t -x img \
        "$W/overlay.qcow2" >"$W/qemu.out" 2>"$W/qemu.err" &
    PID[qemu]=$!
    URI[qemu]="nbd+unix:///img?socket=$sock"
    # nbdkit: base.raw read-only for the read jobs, a copy of it for the write job.
    sock="$W/nbdkit.sock"
    nbdkit -f -r -U "$sock" file "$BASE" >"$W/nbdkit.out" 2>"$W/nbdkit.err" &
    PID[nbdkit]=$!
    URI[nbdkit]="nbd+unix:///?socket=$sock"
    sock="$W/nbdkitw.sock"
    nbdkit -f -U "$sock" file "$W/copy.raw" >"$W/nbdkitw.out" 2>"$W/nbdkitw.err" &
    PID[nbdkitw]=$!
    URI[nbdkitw]="nbd+unix:///?socket=$sock"
    for ((i = 0; i < 200; i++)); do
        grep -q '^serving' "$W/strata.out" 2>/dev/null && break
        kill -0 "${PID[strata]}" 2>/dev/null || die "strata serve exited (see $W/strata.err)"
        sleep 0.05
    done
    for i in "${SERVERS[@]}"; do wait_socket "$i"; done
}

# CPU seconds (user + sys, all threads) of server NAME.
server_cpu() {
    awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' \
        "/proc/${PID[$1]}/stat"
}

# ---------------------------------------------------------------- jobs
# RUNS[server,job] and CPUS[server,job]: one figure per round; the table has medians.
declare -A RUNS CPUS
job_args() {
    case $1 in
    randread | coldread) echo "--rw=randread --bs=4k --iodepth=16" ;;
    seqread) echo "--rw=read --bs=1M --iodepth=4" ;;
    randwrite) echo "--rw=randwrite --bs=4k --iodepth=16 --fsync=64" ;;
    esac
}
run_job() { # SERVER JOB ROUND
    local srv=$1 c0 c1 r cpu out="$W/fio-$1-$2-$3.json"
    [[ $1 == nbdkit && $2 == randwrite ]] && srv=nbdkitw
    c0=$(server_cpu "$srv")
    # shellcheck disable=SC2046
    fio --name="$2" --ioengine=nbd --uri="${URI[$srv]}" $(job_args "$2") --numjobs=1 \
        --time_based --runtime="$RUNTIME" --output-format=json --output="$out" ||
        die "fio $2 against $1 failed"
    c1=$(server_cpu "$srv")
    r=$(python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
if sys.argv[2] == "seqread":
    print("%.1f" % (j["read"]["bw_bytes"] / 1e6))
else:
    print("%.0f" % j["write" if sys.argv[2] == "randwrite" else "read"]["iops"])
' "$out" "$2")
    cpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.1f", b - a }')
    RUNS[$1,$2]+="$r "
    CPUS[$1,$2]+="$cpu "
    log "  $1 $2 (round $3): $r (server cpu $cpu s)"
}
median() { # FORMAT NUMBERS...
    local fmt=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v f="$fmt\n" '{ v[NR] = $1 } END {
        if (NR == 0) print "-"; else if (NR % 2) printf f, v[(NR + 1) / 2];
        else printf f, (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
warm() { cat "$@" >/dev/null; }

START_LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
START_TIME=$(date -u '+%Y-%m-%d %H:%M UTC')

log "warming the page cache; starting strata serve, qemu-nbd, nbdkit (read-only) and nbdkit"
warm "$BASE" "$W/overlay.qcow2" "$W/copy.raw"
find "$STORE" -type f -exec cat {} + >/dev/null
start_servers
ORDER=(strata qemu nbdkit)
# coldread first, while strata's block cache is empty.
for srv in "${ORDER[@]}"; do run_job "$srv" coldread 1; done
qemu-img compare -q -f raw -F raw "$BASE" "${URI[strata]}" ||
    die "strata's session s differs from base.raw"
for j in randread seqread randwrite; do
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((k = 0; k < 3; k++)); do
            run_job "${ORDER[(k + round - 1) % 3]}" "$j" "$round"
        done
    done
done
stop_server

# ---------------------------------------------------------------- report
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
meets() { awk -v r="$1" 'BEGIN { print (r >= 1.0 ? "met" : "NOT met") }'; }
declare -A RES CPU
for key in "${!RUNS[@]}"; do
    fmt=%.0f
    [[ $key == *,seqread ]] && fmt=%.1f
    # shellcheck disable=SC2086
    RES[$key]=$(median "$fmt" ${RUNS[$key]})
    # shellcheck disable=SC2086
    CPU[$key]=$(median %.1f ${CPUS[$key]})
done
{
    echo
    echo "NBD serving benchmark, $START_TIME, $(nproc) cores, load average $START_LOAD"
    echo "  image:  $SIZE_MB MiB raw, $ALLOC_MB MB allocated: $DATA_DESC"
    echo "  strata: import $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s, store $STORED_MB MB; serving session s over img@main"
    echo "  fio $(fio --version) --ioengine=nbd over a Unix socket, numjobs=1, time_based, ${RUNTIME} s per job"
    echo "  page cache warm; servers interleaved; median of $ROUNDS round(s), coldread 1; MB = 10^6 bytes"
    echo "  cpu = server user+sys seconds during the job (median)"
    echo
    printf '%-32s | %9s %9s %9s | %8s %8s | %5s %5s %5s\n' job strata qemu-nbd nbdkit \
        "s/qemu" "s/nbdkit" cpu-s cpu-q cpu-n
    for j in coldread randread seqread randwrite; do
        case $j in
        coldread) label="4K randread qd16 cold (IOPS)" ;;
        randread) label="4K randread qd16 (IOPS)" ;;
        seqread) label="1M seqread qd4 (MB/s)" ;;
        randwrite) label="4K randwrite qd16 fsync64 (IOPS)" ;;
        esac
        printf '%-32s | %9s %9s %9s | %8s %8s | %5s %5s %5s\n' "$label" \
            "${RES[strata,$j]}" "${RES[qemu,$j]}" "${RES[nbdkit,$j]}" \
            "$(ratio "${RES[strata,$j]}" "${RES[qemu,$j]}")" \
            "$(ratio "${RES[strata,$j]}" "${RES[nbdkit,$j]}")" \
            "${CPU[strata,$j]}" "${CPU[qemu,$j]}" "${CPU[nbdkit,$j]}"
    done
    if ((ROUNDS > 1)); then
        echo
        echo "each round, strata / qemu-nbd / nbdkit:"
        for j in randread seqread randwrite; do
            printf '  %-10s %s / %s / %s\n' "$j" "${RUNS[strata,$j]% }" "${RUNS[qemu,$j]% }" \
                "${RUNS[nbdkit,$j]% }"
        done
    fi
    echo
    for j in randread seqread; do
        r=$(ratio "${RES[strata,$j]}" "${RES[nbdkit,$j]}")
        echo "goal strata >= nbdkit on $j: ${r}x ($(meets "$r"))"
    done
    r=$(ratio "${RES[strata,randwrite]}" "${RES[qemu,randwrite]}")
    echo "goal strata >= qemu-nbd on randwrite: ${r}x ($(meets "$r"))"
    r=$(ratio "${RES[strata,coldread]}" "${RES[nbdkit,coldread]}")
    echo "(no goal) strata / nbdkit on coldread, strata's block cache empty at the start: ${r}x"
}
