#!/usr/bin/env bash
# Transfer benchmark: bytes on the wire between a strata hub and its points, against
# rsync (delta transfer over an rsync daemon) and casync (seeded extract over HTTP), on
# the same data, in one run. A script, not a test: it prints a table and exits 0 when
# every transfer ran and every copy came out byte-identical.
#
#   (a) update: a point holding gold v1 pulls v2 from the hub (`strata point pull`);
#       rsync --no-whole-file of v2 onto v1 (without -z, and with -z zstd); casync
#       extract of v2 with --seed=v1.
#   (b) a user's day: a point holding gold v1 and a session over it with a day's
#       writes pushes them (`strata point sync`); rsync of the user's image onto gold on
#       the receiving side; casync extract of the user's image with --seed=gold.
#   (c) cold start: a fresh point attaches gold with a streamed base (`strata point
#       attach --session`, served by `strata point run --no-prefetch` over NBD) and a
#       VM (qemu, the host's kernel and initrd) boots from it; bytes fetched from the
#       hub until the VM's init runs, against the image size.
#   Also, for reference: the initial copy of gold v1 to an empty point.
#
# Data (bench/store_data.py, as bench/store.sh makes it, deterministic for a size):
#   gold    ext4 of BENCH_TRANSFER_MB MiB (default 1024), ~60% full of real files from
#           BENCH_SRC (default "/usr /var/lib"), made with mke2fs -d; it is also a root
#           file system: /bin/busybox (static) and an /sbin/init that prints a marker
#           and powers the VM off
#   update  debugfs -w on a copy of gold: files of ~150 MiB replaced by other real
#           files, ~100 MiB of new files (both scaled by BENCH_TRANSFER_MB/4096)
#   user    gold with 1.5% of its bytes rewritten with random data in runs of 1-64
#           4 KiB blocks at random 4 KiB-aligned offsets (one user's day)
#
# Byte counts. Every transfer goes through bench/transfer_util.py's counting TCP proxy
# on loopback, which counts the TCP payload each way (HTTP headers and bodies, the
# rsync protocol; not TCP/IP headers): that is the "wire" figure the goals use. Each
# tool's own count is shown too: strata's --json wire_sent + wire_received (HTTP
# bodies), rsync's --stats "Total bytes sent" + "received", casync's chunk files it
# needed + the index (computed from the indexes and the store). MB = 10^6 bytes.
#
# Environment:
#   BENCH_TRANSFER_MB  image size in MiB (default 1024; the issue's figure is 4096)
#   BENCH_DIR          work directory (default /tmp/strata-transfer-bench)
#   BENCH_KEEP=1       keep the work directory (and reuse its images on the next run)
#   BENCH_SRC          source directories of the gold image's files
#   BENCH_PARTS        subset of: init a b c (default all)
#   STRATA_BIN         use this strata binary instead of building target/release/strata
#   BENCH_MODEL=0      skip the model of (a) (bench/transfer_util.py delta-model: what
#                      other delta rules would send; needs Python's zstandard)
#   BENCH_QEMU_ACCEL   qemu accelerator for (c) (default tcg: software emulation, slow
#                      but the same everywhere; kvm where nested KVM works)
#
# Usage: bench/transfer.sh ; BENCH_TRANSFER_MB=4096 bench/transfer.sh
set -euo pipefail

SIZE_MB=${BENCH_TRANSFER_MB:-1024}
BENCH_DIR=${BENCH_DIR:-/tmp/strata-transfer-bench}
KEEP=${BENCH_KEEP:-0}
SRC=${BENCH_SRC:-"/usr /var/lib"}
PARTS=${BENCH_PARTS:-"init a b c"}
MODEL=${BENCH_MODEL:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
DATA_PY="$HERE/store_data.py"
UTIL="$HERE/transfer_util.py"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'transfer.sh: %s\n' "$*" >&2; exit 1; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 256 ]] || die "BENCH_TRANSFER_MB must be a number >= 256"

# ---------------------------------------------------------------- tools
install_missing() {
    local -A pkg_of=([rsync]=rsync [casync]=casync [mke2fs]=e2fsprogs [debugfs]=e2fsprogs
        [qemu-io]=qemu-utils [qemu-system-x86_64]=qemu-system-x86 [jq]=jq [python3]=python3)
    local missing=() c
    for c in "${!pkg_of[@]}"; do
        command -v "$c" >/dev/null 2>&1 || missing+=("${pkg_of[$c]}")
    done
    [[ -x /bin/busybox ]] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' ||
        missing+=(busybox-static)
    compgen -G '/boot/vmlinuz-*' >/dev/null || missing+=(linux-image-amd64)
    if ((${#missing[@]})); then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
            die "could not install ${missing[*]}"
    fi
}
export PATH="$PATH:/usr/sbin:/sbin"
install_missing

# ---------------------------------------------------------------- work directory
MARK=.strata-transfer-bench
if [[ -d $BENCH_DIR && -n $(ls -A "$BENCH_DIR") && ! -e $BENCH_DIR/$MARK ]]; then
    die "$BENCH_DIR exists, is not empty and was not made by this script; set BENCH_DIR"
fi
mkdir -p "$BENCH_DIR"
touch "$BENCH_DIR/$MARK"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
IMG="$BENCH_DIR/images" WORK="$BENCH_DIR/work"
PIDS=()
stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    local rc=$?
    stop_all
    if [[ $KEEP == 1 ]]; then
        log "kept $BENCH_DIR"
    else
        rm -rf "$IMG" "$WORK" "${BENCH_DIR:?}/$MARK"
        rmdir "$BENCH_DIR" 2>/dev/null || true
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$WORK"
mkdir -p "$IMG" "$WORK"

need_mb=$((SIZE_MB * 6))
avail_mb=$(($(df -Pk "$BENCH_DIR" | awk 'NR==2 {print $4}') / 1024))
((avail_mb >= need_mb)) || die "needs about $need_mb MB free in $BENCH_DIR, has $avail_mb MB"

# A private copy of the binary: a rebuild in the shared target dir during the run
# must not change what is measured.
mkdir -p "$WORK/bin"
if [[ -n ${STRATA_BIN:-} ]]; then
    cp "$STRATA_BIN" "$WORK/bin/strata"
else
    log "building strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata-cli) || die "cargo build --release failed"
    cp "$ROOT/target/release/strata" "$WORK/bin/strata"
fi
S="$WORK/bin/strata"
export STRATA_LOG=warn
unset STRATA_STORE STRATA_HUB STRATA_HUB_DIR

# ---------------------------------------------------------------- data
make_data() {
    local bytes=$((SIZE_MB << 20)) stage="$WORK/stage"
    rm -rf "${IMG:?}"/* "$stage"
    log "staging ~$((bytes * 6 / 10 / 1000000)) MB of files from $SRC"
    # shellcheck disable=SC2086
    python3 "$DATA_PY" stage --dest "$stage" --budget $((bytes * 6 / 10)) \
        --pool "$WORK/pool.txt" $SRC >"$WORK/stage.json"
    # A root file system: busybox and an init that shows it ran, then powers off. It
    # waits a little after the first marker, so the script reads the byte counters
    # while init has done nothing yet.
    local d
    for d in bin sbin proc sys dev run tmp; do mkdir -p "$stage/$d"; done
    cp /bin/busybox "$stage/bin/busybox"
    cat >"$stage/sbin/init" <<'EOF'
#!/bin/busybox sh
B=/bin/busybox
echo STRATA-INIT-REACHED
$B sleep 3
$B mount -t proc proc /proc
$B mount -o remount,rw /
echo "booted on $($B uname -r)" > /booted-by-strata
$B sync
$B mount -o remount,ro /
echo STRATA-BOOT-DONE
$B poweroff -f
EOF
    chmod 755 "$stage/sbin/init"
    log "gold: mke2fs -t ext4 -d ($(cat "$WORK/stage.json"))"
    local entries inodes
    entries=$(jq '.files + .symlinks + .dirs' "$WORK/stage.json")
    inodes=$((entries * 3 / 2 + 8192))
    ((inodes > bytes / 16384)) || inodes=$((bytes / 16384))
    mke2fs -q -F -t ext4 -b 4096 -T default -N "$inodes" -L gold -d "$stage" \
        "$IMG/gold.raw" "${SIZE_MB}M" >/dev/null

    log "update: debugfs -w on a copy of gold"
    cp --sparse=always "$IMG/gold.raw" "$IMG/update.raw"
    python3 "$DATA_PY" update-cmds --stage "$stage" --pool "$WORK/pool.txt" \
        --replace $((150 * bytes / 4096)) --add $((100 * bytes / 4096)) \
        --out "$WORK/update.cmds" >"$IMG/update.json"
    debugfs -w -f "$WORK/update.cmds" "$IMG/update.raw" >"$WORK/debugfs.log" 2>&1
    if grep -v -E '^(debugfs[ :]|Allocated inode:|$)' "$WORK/debugfs.log" >"$WORK/debugfs.err"; then
        head "$WORK/debugfs.err" >&2
        die "debugfs failed while making the update image"
    fi
    e2fsck -fn "$IMG/update.raw" >"$WORK/fsck.log" 2>&1 || die "update image fails e2fsck (see $WORK/fsck.log)"
    log "update: $(cat "$IMG/update.json")"

    cp --sparse=always "$IMG/gold.raw" "$IMG/user.raw"
    python3 "$DATA_PY" user-changes --image "$IMG/user.raw" --fraction 0.015 --seed 101 \
        --qemu-io-dir "$IMG/user.qio" >"$IMG/user.json"
    log "user: $(cat "$IMG/user.json")"
    rm -rf "$stage" "$WORK/pool.txt"
    touch "$IMG/.done-$SIZE_MB"
}
if [[ -e $IMG/.done-$SIZE_MB ]]; then
    log "reusing the images in $IMG"
else
    make_data
fi
VSIZE=$(stat -c %s "$IMG/gold.raw")
alloc_of() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }
GOLD_ALLOC=$(alloc_of "$IMG/gold.raw")

# ---------------------------------------------------------------- helpers
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_for FILE REGEX SECONDS PID: until FILE has a line matching REGEX (PID alive)
wait_for() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || die "process $4 ended before $1 showed /$2/ (see $WORK)"
        sleep 0.1
    done
    die "$1 did not show /$2/ within $3 s"
}

# start_proxy NAME UPSTREAM_PORT: sets PROXY_PORT[NAME], PROXY_CTL[NAME]
declare -A PROXY_PORT PROXY_CTL
start_proxy() {
    local f="$WORK/proxy-$1.port"
    rm -f "$f"
    python3 "$UTIL" proxy --upstream "127.0.0.1:$2" --port-file "$f" 2>>"$WORK/proxy.log" &
    PIDS+=($!)
    wait_for "$f" . 10 $!
    read -r "PROXY_PORT[$1]" "PROXY_CTL[$1]" <"$f"
}
# counters NAME: "TO_UPSTREAM TO_CLIENT" of proxy NAME so far
counters() {
    local fd up down
    exec {fd}<>"/dev/tcp/127.0.0.1/${PROXY_CTL[$1]}"
    read -r up down _ <&"$fd"
    exec {fd}<&-
    echo "$up $down"
}
# wire_since NAME "UP DOWN": bytes both ways through proxy NAME since that reading
wire_since() {
    local up0 down0 up1 down1
    read -r up0 down0 <<<"$2"
    read -r up1 down1 < <(counters "$1")
    echo $((up1 - up0 + down1 - down0))
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
same() { cmp -s "$1" "$2" || die "$3: $1 differs from $2"; }

# Results: OWN[row,tool] = the tool's own count, WIRE[row,tool] = through the proxy,
# TIME[row,tool] = wall seconds of the transfer.
declare -A OWN WIRE TIME
declare -A NOTE

# ---------------------------------------------------------------- strata
strata_setup() {
    log "strata: hub, operator store, point"
    "$S" -q hub init "$WORK/hub" >/dev/null
    "$S" --json hub run "$WORK/hub" --listen 127.0.0.1:0 >"$WORK/hub.out" 2>"$WORK/hub.log" &
    PIDS+=($!)
    wait_for "$WORK/hub.out" listen 30 $!
    local port
    port=$(head -1 "$WORK/hub.out" | jq -r .listen | sed 's/.*://')
    start_proxy hub "$port"
    HUB_VIA_PROXY="http://127.0.0.1:${PROXY_PORT[hub]}"
    "$S" -q init "$WORK/src" >/dev/null
    "$S" --store "$WORK/src" -q import "$IMG/gold.raw" gold -m v1 >/dev/null
    "$S" --json hub push gold --from-store "$WORK/src" --dir "$WORK/hub" >"$WORK/push-v1.json"
}

# enroll_point NAME: a point store WORK/NAME talking to the hub through the proxy
enroll_point() {
    local token
    token=$("$S" hub enroll "$1" --dir "$WORK/hub" 2>/dev/null)
    "$S" --store "$WORK/$1" -q point enroll "$HUB_VIA_PROXY" "$token" --sync-interval 1h >/dev/null
    "$S" -q hub grant "$1" gold --dir "$WORK/hub" >/dev/null
}

# start_agent NAME SOCKET [ARGS]: `strata point run` on point NAME; sets AGENT_PID
start_agent() {
    local name=$1 sock=$2
    shift 2
    rm -f "$sock"
    "$S" --store "$WORK/$name" point run --socket "$sock" --sync-interval 1h "$@" \
        >"$WORK/agent-$name.out" 2>"$WORK/agent-$name.log" &
    AGENT_PID=$!
    PIDS+=("$AGENT_PID")
    wait_for "$WORK/agent-$name.out" serving 30 "$AGENT_PID"
}
# strata_note JSON PATH: what a transfer report at PATH says it moved
strata_note() {
    jq -r "$2"' | "\(.data_objects) data objects (\(.deltas) as deltas, \(.paged // 0) with page runs), \(.tree_objects) tree nodes, \(.logical_bytes / 1e4 | round / 100) MB logical"' "$1"
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

strata_initial() {
    log "strata: initial pull of gold v1 by point pt"
    enroll_point pt
    local c0 t0
    c0=$(counters hub) t0=$(now)
    "$S" --store "$WORK/pt" --json point pull gold >"$WORK/pull-v1.json"
    TIME[init,strata]=$(secs "$t0" "$(now)")
    WIRE[init,strata]=$(wire_since hub "$c0")
    OWN[init,strata]=$(jq '.wire_sent + .wire_received' "$WORK/pull-v1.json")
    NOTE[init,strata]=$(strata_note "$WORK/pull-v1.json" .transfer)
}

strata_user_day() {
    log "strata (b): session user over gold v1 on point pt, a day's writes, point sync"
    "$S" --store "$WORK/pt" --json point attach gold@main --session user >"$WORK/attach-user.json"
    start_agent pt "$WORK/pt.sock"
    qemu-io -f raw "nbd+unix:///user?socket=$WORK/pt.sock" <"$IMG/user.qio/cmds" >"$WORK/qemu-io.log" 2>&1 ||
        die "qemu-io writes into the session failed (see $WORK/qemu-io.log)"
    local c0 t0
    c0=$(counters hub) t0=$(now)
    "$S" --store "$WORK/pt" --json point sync >"$WORK/sync-user.json"
    TIME[b,strata]=$(secs "$t0" "$(now)")
    WIRE[b,strata]=$(wire_since hub "$c0")
    jq -e '.ok' "$WORK/sync-user.json" >/dev/null || die "point sync failed: $(cat "$WORK/sync-user.json")"
    OWN[b,strata]=$(jq '.wire_sent + .wire_received' "$WORK/sync-user.json")
    NOTE[b,strata]=$(strata_note "$WORK/sync-user.json" '.sessions[0].pushed')
    stop_pid "$AGENT_PID"
    "$S" --store "$WORK/hub/store" -q export user@main "$WORK/check.raw" --force >/dev/null
    same "$WORK/check.raw" "$IMG/user.raw" "strata (b): the hub's user@main"
    rm -f "$WORK/check.raw"
}

strata_update() {
    log "strata (a): gold v2 pushed to the hub; point pt (holding v1) pulls it"
    "$S" --store "$WORK/src" -q import "$IMG/update.raw" gold -m v2 >/dev/null
    "$S" --json hub push gold --from-store "$WORK/src" --dir "$WORK/hub" >"$WORK/push-v2.json"
    local c0 t0
    c0=$(counters hub) t0=$(now)
    "$S" --store "$WORK/pt" --json point pull gold >"$WORK/pull-v2.json"
    TIME[a,strata]=$(secs "$t0" "$(now)")
    WIRE[a,strata]=$(wire_since hub "$c0")
    OWN[a,strata]=$(jq '.wire_sent + .wire_received' "$WORK/pull-v2.json")
    NOTE[a,strata]=$(strata_note "$WORK/pull-v2.json" .transfer)
    "$S" --store "$WORK/pt" -q export gold@main "$WORK/check.raw" --force >/dev/null
    same "$WORK/check.raw" "$IMG/update.raw" "strata (a): the point's gold@main"
    rm -f "$WORK/check.raw"
}

strata_cold_boot() {
    log "strata (c): point pc attaches gold@main streamed; a VM boots from it"
    enroll_point pc
    local c0 c1 t0 kernel initrd qpid i status=0
    c0=$(counters hub) t0=$(now)
    "$S" --store "$WORK/pc" --json point attach gold@main --session vm >"$WORK/attach-vm.json"
    jq -e '.streaming | objects' "$WORK/attach-vm.json" >/dev/null || die "attach did not stream the base"
    BOOT_ATTACH_WIRE=$(wire_since hub "$c0")
    BOOT_ATTACH_OWN=$(jq .wire_received "$WORK/attach-vm.json")
    start_agent pc "$WORK/pc.sock" --no-prefetch
    c1=$(counters hub)
    kernel=$(printf '%s\n' /boot/vmlinuz-* | sort -V | tail -1)
    initrd=$(printf '%s\n' /boot/initrd.img-* | sort -V | tail -1)
    local accel=${BENCH_QEMU_ACCEL:-tcg}
    BOOT_ACCEL=$accel
    rm -f "$WORK/serial.log"
    qemu-system-x86_64 -machine "q35,accel=$accel" -m 512 -smp 1 \
        -display none -monitor none -nic none -no-reboot \
        -serial "file:$WORK/serial.log" -kernel "$kernel" -initrd "$initrd" \
        -append "root=/dev/vda rw console=ttyS0 panic=-1" \
        -drive "if=virtio,format=raw,cache=none,file.driver=nbd,file.server.type=unix,file.server.path=$WORK/pc.sock,file.export=vm" \
        >/dev/null 2>"$WORK/qemu.log" &
    qpid=$!
    PIDS+=("$qpid")
    for ((i = 0; i < 6000; i++)); do
        grep -q STRATA-INIT-REACHED "$WORK/serial.log" 2>/dev/null && break
        kill -0 "$qpid" 2>/dev/null || break
        sleep 0.1
    done
    grep -q STRATA-INIT-REACHED "$WORK/serial.log" 2>/dev/null ||
        { tail -30 "$WORK/serial.log" >&2; die "the VM never reached its init"; }
    BOOT_INIT_SECS=$(secs "$t0" "$(now)")
    BOOT_INIT_WIRE=$(wire_since hub "$c1")
    wait "$qpid" || status=$?
    if ! grep -q STRATA-BOOT-DONE "$WORK/serial.log" || ((status != 0)); then
        tail -30 "$WORK/serial.log" >&2
        die "the VM did not finish its init (qemu status $status)"
    fi
    BOOT_DONE_WIRE=$(wire_since hub "$c1")
    BOOT_KERNEL=$(basename "$kernel")
    "$S" --store "$WORK/pc" --json point status >"$WORK/status-pc.json"
    BOOT_DONE_OWN=$(jq '.sessions[0].prefetch.bytes_fetched // 0' "$WORK/status-pc.json")
    BOOT_DONE_OBJECTS=$(jq '.sessions[0].prefetch.objects_fetched // 0' "$WORK/status-pc.json")
    BOOT_BLOCKS_TOTAL=$(jq '.sessions[0].prefetch.blocks_total // 0' "$WORK/status-pc.json")
    stop_pid "$AGENT_PID"
}

# ---------------------------------------------------------------- rsync
rsync_setup() {
    local port
    port=$(free_port)
    mkdir -p "$WORK/rsync/src" "$WORK/rsync/dst" "$WORK/rsync/local"
    cat >"$WORK/rsyncd.conf" <<EOF
pid file = $WORK/rsyncd.pid
address = 127.0.0.1
port = $port
use chroot = false
uid = $(id -u)
gid = $(id -g)
[src]
path = $WORK/rsync/src
read only = true
[dst]
path = $WORK/rsync/dst
read only = false
EOF
    rsync --daemon --no-detach --config="$WORK/rsyncd.conf" --log-file="$WORK/rsyncd.log" &
    PIDS+=($!)
    local i
    for ((i = 0; i < 50; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    start_proxy rsync "$port"
    RSYNC_URL="rsync://127.0.0.1:${PROXY_PORT[rsync]}"
}
# rsync_total LOG: "Total bytes sent" + "Total bytes received" of --stats
rsync_total() {
    awk -F: '/^Total bytes (sent|received)/ { gsub(/[ ,]/, "", $2); s += $2 } END { printf "%d", s }' "$1"
}
# rsync_run ROW TOOL SOURCE DEST EXPECTED [OPTIONS]: one delta transfer, checked
rsync_run() {
    local row=$1 tool=$2 src=$3 dst=$4 expect=$5 c0 t0
    shift 5
    c0=$(counters rsync) t0=$(now)
    rsync -I --no-whole-file --stats "$@" "$src" "$dst" >"$WORK/rsync-$row-$tool.log" 2>&1 ||
        { cat "$WORK/rsync-$row-$tool.log" >&2; die "rsync ($row, $tool) failed"; }
    TIME[$row,$tool]=$(secs "$t0" "$(now)")
    WIRE[$row,$tool]=$(wire_since rsync "$c0")
    OWN[$row,$tool]=$(rsync_total "$WORK/rsync-$row-$tool.log")
    NOTE[$row,$tool]=$(grep -E '^(Literal|Matched) data' "$WORK/rsync-$row-$tool.log" | tr '\n' ' ')
    local got=$dst
    [[ $dst == rsync://* ]] && got="$WORK/rsync/dst/$(basename "$dst")"
    same "$got" "$expect" "rsync ($row, $tool)"
}
rsync_all() {
    log "rsync: daemon on loopback"
    rsync_setup
    local tool opts
    for tool in rsync rsync-z; do
        opts=()
        [[ $tool == rsync-z ]] && opts=(-z --compress-choice=zstd)
        if want init; then
            # The initial copy: no basis on the receiving side.
            ln -f "$IMG/gold.raw" "$WORK/rsync/src/gold.raw"
            rm -f "$WORK/rsync/local/gold.raw"
            log "rsync ($tool): initial copy of gold"
            rsync_run init "$tool" "$RSYNC_URL/src/gold.raw" "$WORK/rsync/local/gold.raw" "$IMG/gold.raw" \
                "${opts[@]}"
            rm -f "$WORK/rsync/local/gold.raw"
        fi
        if want a; then
            # The receiver's basis is gold (v1) under the name being fetched. rsync writes
            # a new file and renames it over the name, so a hard link to gold is safe.
            ln -f "$IMG/update.raw" "$WORK/rsync/src/img.raw"
            ln -f "$IMG/gold.raw" "$WORK/rsync/local/img.raw"
            log "rsync ($tool, a): v2 onto v1"
            rsync_run a "$tool" "$RSYNC_URL/src/img.raw" "$WORK/rsync/local/img.raw" "$IMG/update.raw" \
                "${opts[@]}"
            rm -f "$WORK/rsync/local/img.raw"
        fi
        if want b; then
            ln -f "$IMG/gold.raw" "$WORK/rsync/dst/img.raw"
            log "rsync ($tool, b): user image onto gold at the receiver"
            rsync_run b "$tool" "$IMG/user.raw" "$RSYNC_URL/dst/img.raw" "$IMG/user.raw" "${opts[@]}"
            rm -f "$WORK/rsync/dst/img.raw"
        fi
    done
}

# ---------------------------------------------------------------- casync
# casync_index NAME FILE: make NAME.caibx and its chunk store under WORK/casync/NAME
casync_index() {
    local d="$WORK/casync/$1"
    mkdir -p "$d"
    log "casync: make $1"
    casync make --store="$d/store" "$d/$1.caibx" "$2" >/dev/null
}
# casync_run ROW NAME SEED EXPECTED: extract NAME (served over HTTP through the
# proxy) with --seed=SEED, count, check; the own count is computed from the indexes
casync_run() {
    local row=$1 name=$2 seed=$3 expect=$4 d="$WORK/casync/$2" f port c0 t0
    f="$WORK/http-$name.port"
    rm -f "$f"
    python3 "$UTIL" serve --dir "$d" --port-file "$f" 2>>"$WORK/http.log" &
    local hpid=$!
    PIDS+=("$hpid")
    wait_for "$f" . 10 "$hpid"
    port=$(cat "$f")
    start_proxy "casync-$name" "$port"
    local url="http://127.0.0.1:${PROXY_PORT[casync-$name]}"
    rm -f "$WORK/casync/out.raw"
    log "casync ($row): extract $name with --seed=$(basename "$seed")"
    c0=$(counters "casync-$name") t0=$(now)
    casync extract --seed="$seed" --store="$url/store" "$url/$name.caibx" "$WORK/casync/out.raw" \
        >"$WORK/casync-$row.log" 2>&1 || { cat "$WORK/casync-$row.log" >&2; die "casync extract ($row) failed"; }
    TIME[$row,casync]=$(secs "$t0" "$(now)")
    WIRE[$row,casync]=$(wire_since "casync-$name" "$c0")
    same "$WORK/casync/out.raw" "$expect" "casync ($row)"
    rm -f "$WORK/casync/out.raw"
    python3 "$UTIL" casync-need --index "$d/$name.caibx" --seed-index "$WORK/casync/gold/gold.caibx" \
        --store "$d/store" >"$WORK/casync-$row.json"
    OWN[$row,casync]=$(jq .total "$WORK/casync-$row.json")
    NOTE[$row,casync]="$(jq -r '"\(.needed_chunks) of \(.distinct_chunks) chunks"' "$WORK/casync-$row.json")"
}
casync_all() {
    casync_index gold "$IMG/gold.raw"
    if want init; then
        # The initial copy: every chunk of gold, compressed, plus the index.
        local d="$WORK/casync/gold"
        OWN[init,casync]=$(($(find "$d/store" -type f -name '*.cacnk' -printf '%s\n' |
            awk '{ s += $1 } END { printf "%d", s }') + $(stat -c %s "$d/gold.caibx")))
    fi
    if want a; then
        casync_index v2 "$IMG/update.raw"
        casync_run a v2 "$IMG/gold.raw" "$IMG/update.raw"
        rm -rf "$WORK/casync/v2"
    fi
    if want b; then
        casync_index user "$IMG/user.raw"
        casync_run b user "$IMG/gold.raw" "$IMG/user.raw"
        rm -rf "$WORK/casync/user"
    fi
    rm -rf "$WORK/casync"
}

# ---------------------------------------------------------------- run
if want init || want a || want b || want c; then
    strata_setup
    if want init || want a || want b; then strata_initial; fi
    if want b; then strata_user_day; fi
    if want a; then strata_update; fi
    if want c; then strata_cold_boot; fi
    stop_all
fi
if want a && [[ $MODEL == 1 ]]; then
    if python3 -c 'import zstandard' 2>/dev/null; then
        log "model of (a): bench/transfer_util.py delta-model"
        python3 "$UTIL" delta-model --old "$IMG/gold.raw" --new "$IMG/update.raw" >"$WORK/model-a.json"
    else
        log "no Python zstandard module: skipping the model of (a) (pip install zstandard)"
    fi
fi
if want init || want a || want b; then
    rsync_all
    stop_all
    casync_all
    stop_all
fi

# ---------------------------------------------------------------- report
mb() { if [[ -z ${1:-} ]]; then printf -- -; else awk -v b="$1" 'BEGIN { printf "%.2f", b / 1e6 }'; fi; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }

echo
echo "Transfer benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  gold:   ${SIZE_MB} MiB ext4 (mke2fs -d) of files from '$SRC' + busybox init, $(mb "$GOLD_ALLOC") MB allocated"
jq -r '"  update: \(.replaced_files) files replaced by \(.replaced_bytes / 1e6 * 100 | round / 100) MB of other real files, \(.added_files) new files of \(.added_bytes / 1e6 * 100 | round / 100) MB (debugfs -w)"' "$IMG/update.json"
jq -r --arg size "$VSIZE" '"  user:   \(.bytes / 1e6 * 100 | round / 100) MB (\(.bytes / ($size | tonumber) * 1000 | round / 10)%) of random data in \(.runs) runs of 4-256 KiB at 4 KiB-aligned random offsets"' "$IMG/user.json"
echo "  wire = TCP payload both ways through a counting proxy on loopback; own = the tool's count"
echo "  (strata: --json wire_sent+wire_received; rsync: --stats total sent+received; casync: needed .cacnk + index)"
echo "  MB = 10^6 bytes; s = wall seconds of the transfer"
echo
ROWS=()
declare -A ROW_LABEL=([init]="initial copy of gold v1" [a]="(a) gold v1 -> v2, pull" [b]="(b) a user's day, push")
for r in init a b; do want "$r" && ROWS+=("$r"); done
TOOLS=(strata rsync rsync-z casync)
declare -A TOOL_LABEL=([strata]="strata" [rsync]="rsync" [rsync-z]="rsync -z zstd" [casync]="casync")
if ((${#ROWS[@]})); then
    fmt='%-26s | %-14s | %10s %10s %7s | %s\n'
    # shellcheck disable=SC2059
    printf "$fmt" "" "tool" "wire MB" "own MB" "s" "notes"
    for r in "${ROWS[@]}"; do
        for t in "${TOOLS[@]}"; do
            [[ -n ${OWN[$r,$t]:-}${WIRE[$r,$t]:-} ]] || continue
            # shellcheck disable=SC2059
            printf "$fmt" "${ROW_LABEL[$r]}" "${TOOL_LABEL[$t]}" "$(mb "${WIRE[$r,$t]:-}")" \
                "$(mb "${OWN[$r,$t]:-}")" "${TIME[$r,$t]:--}" "${NOTE[$r,$t]:-}"
        done
    done
    echo
    for r in a b; do
        want "$r" || continue
        best="" best_b=""
        for t in rsync-z casync; do
            v=${WIRE[$r,$t]:-${OWN[$r,$t]:-}}
            [[ -n $v ]] || continue
            if [[ -z $best_b ]] || ((v < best_b)); then best=$t best_b=$v; fi
        done
        x=$(ratio "${WIRE[$r,strata]}" "$best_b")
        verdict=$(awk -v x="$x" 'BEGIN { print (x <= 1.0) ? "met" : "NOT met" }')
        echo "${ROW_LABEL[$r]}: strata / best of rsync -z and casync (${TOOL_LABEL[$best]}), on the wire: ${x}x  (goal <= 1: $verdict)"
        echo "  same with each tool's own count: $(ratio "${OWN[$r,strata]}" "${OWN[$r,$best]}")x"
    done
fi
if [[ -s $WORK/model-a.json ]]; then
    echo
    echo "Model of (a) (bench/transfer_util.py delta-model; zstd-3 streams of the data blocks only, no tree nodes):"
    jq -r '"  \(.blocks_sent) blocks sent (\(.raw_bytes / 1e4 | round / 100) MB), \(.blocks_changed_but_deduplicated) more changed but deduplicated",
        "  all raw: \(.raw_stream / 1e4 | round / 100) MB; the hub'"'"'s delta rule (\(.strata_rule_deltas) deltas): \(.strata_rule_stream / 1e4 | round / 100) MB;" +
        " deltas only when < 0.8x the block compressed alone (\(.alt_rule_deltas)): \(.alt_rule_stream / 1e4 | round / 100) MB",
        "  4 KiB pages of those blocks: \(.pages_unchanged_in_place) unchanged in place, \(.pages_found_elsewhere_in_old_or_zero) found elsewhere in v1;" +
        " the rest, \(.literal_bytes / 1e4 | round / 100) MB, as a stream: \(.literal_stream / 1e4 | round / 100) MB (page references + literal pages)",
        "  one zstd frame per 64 blocks, prefixed with v1'"'"'s blocks at the same places: \(.batch_same_place / 1e4 | round / 100) MB;" +
        " and with the blocks of v1 holding their changed pages: \(.batch_pages / 1e4 | round / 100) MB"' \
        "$WORK/model-a.json"
fi
if want c; then
    pct=$(awk -v a="$BOOT_INIT_WIRE" -v c="$BOOT_ATTACH_WIRE" -v b="$VSIZE" 'BEGIN { printf "%.2f", 100 * (a + c) / b }')
    verdict=$(awk -v p="$pct" 'BEGIN { print (p <= 10) ? "met" : "NOT met" }')
    echo
    echo "(c) cold start from a streamed base ($BOOT_KERNEL, accel $BOOT_ACCEL, point run --no-prefetch):"
    echo "  attach (version record + tree): $(mb "$BOOT_ATTACH_WIRE") MB on the wire ($(mb "$BOOT_ATTACH_OWN") MB own count)"
    echo "  boot until init runs: $(mb "$BOOT_INIT_WIRE") MB on the wire, ${BOOT_INIT_SECS} s after attach began"
    echo "  whole boot, init's writes and poweroff: $(mb "$BOOT_DONE_WIRE") MB on the wire; $BOOT_DONE_OBJECTS of $BOOT_BLOCKS_TOTAL blocks fetched, $(mb "$BOOT_DONE_OWN") MB uncompressed"
    echo "  attach + boot until init, / image size ($(mb "$VSIZE") MB): ${pct}%  (goal <= 10%: $verdict);" \
        "/ allocated bytes: $(awk -v a="$BOOT_INIT_WIRE" -v c="$BOOT_ATTACH_WIRE" -v b="$GOLD_ALLOC" 'BEGIN { printf "%.2f", 100 * (a + c) / b }')%;" \
        "/ initial copy by strata: $(awk -v a="$BOOT_INIT_WIRE" -v c="$BOOT_ATTACH_WIRE" -v b="${WIRE[init,strata]:-0}" 'BEGIN { if (b > 0) printf "%.2f%%", 100 * (a + c) / b; else printf "-" }')"
fi
