#!/usr/bin/env bash
# Store benchmark: import speed and stored size of a fleet of disk images, strata
# against restic, borg, casync, qcow2 overlays and plain zstd, on the same data in
# one run. A script, not a test: it prints a table and exits 0 when every tool ran.
#
# Data (built here, deterministic for a given size and source tree):
#   gold    an ext4 file system of BENCH_IMAGE_MB (default 4096) MiB, about 60% full
#           of real files picked at random from BENCH_SRC (default "/usr /var/lib"),
#           made with `mke2fs -t ext4 -d STAGING_DIR`; a sparse raw file
#   update  a copy of gold where debugfs -w replaced files holding ~150 MiB by other
#           real files of about the same size and added ~100 MiB of new files (both
#           scaled by BENCH_IMAGE_MB/4096); unchanged blocks stay in place
#   users   BENCH_USERS (default 10) copies of gold, each with ~1.5% of its bytes
#           rewritten with random data, in runs of 1-64 4 KiB blocks at random
#           4 KiB-aligned offsets
# Each tool imports gold, update, then the users into ONE repository/store, so dedup
# across images counts. Before each import the input file is read once (page cache
# warm for every tool alike), so times measure the tool, not the disk.
#
# Figures: MB = 10^6 bytes. "logical MB/s" = virtual size / wall time; "alloc MB/s" =
# allocated bytes of the input / wall time. Stored = sum of the sizes of all files in
# the repository (packs, indexes, catalog). The limit is the sum of the zstd-3 sizes
# of the distinct non-zero 64 KiB blocks of all images (bench/store_data.py limit).
#
# Environment:
#   BENCH_IMAGE_MB  image size in MiB (default 4096; 256 for a quick run)
#   BENCH_USERS     number of user images (default 10)
#   BENCH_DIR       work directory (default /tmp/strata-bench)
#   BENCH_KEEP=1    keep the work directory (and reuse its images on the next run)
#   BENCH_SRC       source directories of the gold image's files
#   BENCH_TOOLS     subset of: strata restic borg-zstd borg-lz4 casync qcow2 zstd
#   STRATA_BIN      use this strata binary instead of building target/release/strata
#
# Usage: BENCH_IMAGE_MB=256 bench/store.sh
set -euo pipefail

SIZE_MB=${BENCH_IMAGE_MB:-4096}
USERS=${BENCH_USERS:-10}
BENCH_DIR=${BENCH_DIR:-/tmp/strata-bench}
KEEP=${BENCH_KEEP:-0}
SRC=${BENCH_SRC:-"/usr /var/lib"}
TOOLS=${BENCH_TOOLS:-"strata restic borg-zstd borg-lz4 casync qcow2 zstd"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
DATA_PY="$HERE/store_data.py"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'store.sh: %s\n' "$*" >&2; exit 1; }

[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 64 ]] || die "BENCH_IMAGE_MB must be a number >= 64"
[[ $USERS =~ ^[0-9]+$ && $USERS -ge 1 ]] || die "BENCH_USERS must be a number >= 1"

# ---------------------------------------------------------------- tools
install_missing() {
    local -A pkg_of=([restic]=restic [borg]=borgbackup [casync]=casync [zstd]=zstd
        [mke2fs]=e2fsprogs [debugfs]=e2fsprogs [qemu-img]=qemu-utils [qemu-io]=qemu-utils
        [python3]=python3)
    local missing=() c
    for c in "${!pkg_of[@]}"; do
        command -v "$c" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null 2>&1 ||
            missing+=("${pkg_of[$c]}")
    done
    if ((${#missing[@]})); then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q "${missing[@]}" >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } ||
            die "could not install ${missing[*]}"
    fi
    if ! python3 -c 'import zstandard, blake3' 2>/dev/null; then
        log "installing the python modules zstandard and blake3"
        python3 -m pip --version >/dev/null 2>&1 || apt-get install -y -q python3-pip >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q python3-pip >/dev/null; }
        python3 -m pip install -q zstandard blake3 2>/dev/null ||
            python3 -m pip install -q --break-system-packages zstandard blake3 ||
            die "could not install the python modules zstandard and blake3"
    fi
}
export PATH="$PATH:/usr/sbin:/sbin"
install_missing

if [[ -n ${STRATA_BIN:-} ]]; then
    STRATA=$STRATA_BIN
elif [[ " $TOOLS " == *" strata "* ]]; then
    log "building strata (release)"
    (cd "$ROOT" && cargo build --release -q -p strata-cli) || die "cargo build --release failed"
    STRATA="$ROOT/target/release/strata"
fi

# ---------------------------------------------------------------- work directory
MARK=.strata-bench
if [[ -d $BENCH_DIR && -n $(ls -A "$BENCH_DIR") && ! -e $BENCH_DIR/$MARK ]]; then
    die "$BENCH_DIR exists, is not empty and was not made by this script; set BENCH_DIR"
fi
mkdir -p "$BENCH_DIR"
touch "$BENCH_DIR/$MARK"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
IMG="$BENCH_DIR/images" REPOS="$BENCH_DIR/repos" WORK="$BENCH_DIR/work"
cleanup() {
    local rc=$?
    if [[ $KEEP == 1 ]]; then
        log "kept $BENCH_DIR"
    else
        rm -rf "$IMG" "$REPOS" "$WORK" "${BENCH_DIR:?}/$MARK"
        rmdir "$BENCH_DIR" 2>/dev/null || true
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$REPOS" "$WORK"
mkdir -p "$IMG" "$REPOS" "$WORK"

# Rough space check: the images (about 75% allocated each) plus the repositories.
need_mb=$(((USERS + 2) * SIZE_MB * 3 / 4 + 2 * SIZE_MB))
avail_mb=$(($(df -Pk "$BENCH_DIR" | awk 'NR==2 {print $4}') / 1024))
if [[ ! -e $IMG/.done-$SIZE_MB-$USERS ]] && ((avail_mb < need_mb)); then
    die "needs about $need_mb MB free in $BENCH_DIR, has $avail_mb MB"
fi

USER_NAMES=()
for ((i = 1; i <= USERS; i++)); do USER_NAMES+=("$(printf 'user%02d' "$i")"); done
IMAGES=(gold update "${USER_NAMES[@]}")

# ---------------------------------------------------------------- data
make_data() {
    local bytes=$((SIZE_MB << 20))
    rm -rf "$IMG" && mkdir -p "$IMG"
    log "staging ~$((bytes * 6 / 10 / 1000000)) MB of files from $SRC"
    # shellcheck disable=SC2086
    python3 "$DATA_PY" stage --dest "$WORK/stage" --budget $((bytes * 6 / 10)) \
        --pool "$WORK/pool.txt" $SRC >"$WORK/stage.json"
    log "gold: mke2fs -t ext4 -d ($(cat "$WORK/stage.json"))"
    # Default inode ratio (16 KiB), unless the staged tree (and the update) needs more.
    local entries inodes
    entries=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["files"]+d["symlinks"]+d["dirs"])' \
        "$WORK/stage.json")
    inodes=$((entries * 3 / 2 + 8192))
    ((inodes > bytes / 16384)) || inodes=$((bytes / 16384))
    mke2fs -q -F -t ext4 -b 4096 -T default -N "$inodes" -L gold -d "$WORK/stage" \
        "$IMG/gold.raw" "${SIZE_MB}M" >/dev/null

    log "update: debugfs -w on a copy of gold"
    cp --sparse=always "$IMG/gold.raw" "$IMG/update.raw"
    python3 "$DATA_PY" update-cmds --stage "$WORK/stage" --pool "$WORK/pool.txt" \
        --replace $((150 * bytes / 4096)) --add $((100 * bytes / 4096)) \
        --out "$WORK/update.cmds" >"$IMG/update.json"
    debugfs -w -f "$WORK/update.cmds" "$IMG/update.raw" >"$WORK/debugfs.log" 2>&1
    if grep -v -E '^(debugfs[ :]|Allocated inode:|$)' "$WORK/debugfs.log" >"$WORK/debugfs.err"; then
        head "$WORK/debugfs.err" >&2
        die "debugfs failed while making the update image"
    fi
    e2fsck -fn "$IMG/update.raw" >"$WORK/fsck.log" 2>&1 || die "update image fails e2fsck (see $WORK/fsck.log)"
    log "update: $(cat "$IMG/update.json")"

    local u seed=100
    for u in "${USER_NAMES[@]}"; do
        seed=$((seed + 1))
        cp --sparse=always "$IMG/gold.raw" "$IMG/$u.raw"
        python3 "$DATA_PY" user-changes --image "$IMG/$u.raw" --fraction 0.015 --seed $seed \
            --qemu-io-dir "$IMG/$u.qio" >"$IMG/$u.json"
    done
    log "users: ${#USER_NAMES[@]} x $(cat "$IMG/user01.json")"
    rm -rf "$WORK/stage" "$WORK/pool.txt"
    touch "$IMG/.done-$SIZE_MB-$USERS"
}
if [[ -e $IMG/.done-$SIZE_MB-$USERS ]]; then
    log "reusing the images in $IMG"
else
    make_data
fi

VSIZE=$(stat -c %s "$IMG/gold.raw")
alloc_of() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1"))); }
FLEET_LOGICAL=0 FLEET_ALLOC=0
for n in "${IMAGES[@]}"; do
    FLEET_LOGICAL=$((FLEET_LOGICAL + $(stat -c %s "$IMG/$n.raw")))
    FLEET_ALLOC=$((FLEET_ALLOC + $(alloc_of "$IMG/$n.raw")))
done
GOLD_ALLOC=$(alloc_of "$IMG/gold.raw")

log "limit: distinct non-zero 64 KiB blocks, zstd -3"
jget() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
IMAGE_FILES=()
for n in "${IMAGES[@]}"; do IMAGE_FILES+=("$IMG/$n.raw"); done
LIMIT_JSON=$(python3 "$DATA_PY" limit --block-size 65536 "${IMAGE_FILES[@]}")
LIMIT_GOLD=$(jget "$LIMIT_JSON" first)
LIMIT_FLEET=$(jget "$LIMIT_JSON" all)
DISTINCT=$(jget "$LIMIT_JSON" all_distinct_bytes)

# ---------------------------------------------------------------- measuring
declare -A T C     # T[tool,image] = wall seconds, C[tool,image] = CPU seconds (user + sys)
declare -A GOLD_STORED FLEET_STORED

warm() { cat "$1" >/dev/null; }
dir_bytes() { find "$@" -type f -printf '%s\n' 2>/dev/null | awk '{ s += $1 } END { printf "%d", s }'; }

# run TOOL IMAGE CMD...: time CMD (its output goes to the tool's log)
run() {
    local tool=$1 name=$2 real user sys TIMEFORMAT='%R %U %S'
    shift 2
    warm "$IMG/$name.raw"
    if ! { time "$@" >>"$WORK/$tool.log" 2>&1; } 2>"$WORK/time"; then
        tail -20 "$WORK/$tool.log" >&2
        die "$tool failed on $name: $*"
    fi
    read -r real user sys <"$WORK/time"
    T[$tool,$name]=$real
    C[$tool,$name]=$(awk -v a="$user" -v b="$sys" 'BEGIN { printf "%.3f", a + b }')
}

bench_strata() {
    local r="$REPOS/strata" u n f
    "$STRATA" init "$r" >/dev/null
    run strata gold "$STRATA" --store "$r" -q import "$IMG/gold.raw" vm -m gold
    "$STRATA" --store "$r" -q tag add vm@main gold >/dev/null
    GOLD_STORED[strata]=$(dir_bytes "$r")
    run strata update "$STRATA" --store "$r" -q import "$IMG/update.raw" vm -m update
    for u in "${USER_NAMES[@]}"; do
        # A user's disk is a clone of gold (free) with the user's image imported on it.
        run strata "$u" bash -c "\"\$0\" --store \"\$1\" -q clone vm@gold $u &&
            \"\$0\" --store \"\$1\" -q import \"\$2\" $u -m $u" "$STRATA" "$r" "$IMG/$u.raw"
    done
    FLEET_STORED[strata]=$(dir_bytes "$r")
    # Not timed: the store must hold what was imported.
    "$STRATA" --store "$r" -q verify >>"$WORK/strata.log" 2>&1 || die "strata verify failed"
    for n in vm@gold vm@main "${USER_NAMES[-1]}"; do
        "$STRATA" --store "$r" -q export "$n" "$WORK/export.raw" --force >>"$WORK/strata.log" 2>&1
        case $n in vm@gold) f=gold ;; vm@main) f=update ;; *) f=$n ;; esac
        cmp -s "$WORK/export.raw" "$IMG/$f.raw" || die "strata export of $n differs from $f.raw"
    done
    rm -f "$WORK/export.raw"
}

bench_restic() {
    local r="$REPOS/restic" n
    export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR="$WORK/restic-cache"
    restic -r "$r" init >/dev/null
    for n in "${IMAGES[@]}"; do
        run restic "$n" restic -r "$r" backup --quiet --host bench --tag "$n" "$IMG/$n.raw"
        [[ $n == gold ]] && GOLD_STORED[restic]=$(dir_bytes "$r")
    done
    FLEET_STORED[restic]=$(dir_bytes "$r")
}

bench_borg() { # bench_borg TOOL [--compression C]
    local tool=$1 r="$REPOS/$1" n
    shift
    export BORG_BASE_DIR="$WORK/borg-base" BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
        BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
    borg init -e none "$r" >/dev/null 2>&1
    for n in "${IMAGES[@]}"; do
        run "$tool" "$n" borg create "$@" "$r::$n" "$IMG/$n.raw"
        [[ $n == gold ]] && GOLD_STORED[$tool]=$(dir_bytes "$r")
    done
    FLEET_STORED[$tool]=$(dir_bytes "$r")
}

bench_casync() {
    local r="$REPOS/casync" n
    mkdir -p "$r"
    for n in "${IMAGES[@]}"; do
        run casync "$n" casync make --store="$r/store" "$r/$n.caibx" "$IMG/$n.raw"
        [[ $n == gold ]] && GOLD_STORED[casync]=$(dir_bytes "$r")
    done
    FLEET_STORED[casync]=$(dir_bytes "$r")
}

bench_qcow2() {
    local r="$REPOS/qcow2" u
    mkdir -p "$r"
    run qcow2 gold qemu-img convert -O qcow2 "$IMG/gold.raw" "$r/gold.qcow2"
    GOLD_STORED[qcow2]=$(dir_bytes "$r")
    # The update as an overlay holding what differs from gold.
    run qcow2 update qemu-img convert -O qcow2 -B "$r/gold.qcow2" -F qcow2 "$IMG/update.raw" "$r/update.qcow2"
    for u in "${USER_NAMES[@]}"; do
        # A user's disk: an overlay on gold, with the user's writes written into it.
        run qcow2 "$u" bash -c "qemu-img create -q -f qcow2 -b \"\$1\" -F qcow2 \"\$2\" &&
            qemu-io -f qcow2 \"\$2\" <\"\$3\" >/dev/null" _ \
            "$r/gold.qcow2" "$r/$u.qcow2" "$IMG/$u.qio/cmds"
        qemu-img compare -q "$r/$u.qcow2" "$IMG/$u.raw" || die "qcow2 overlay of $u differs from $u.raw"
    done
    FLEET_STORED[qcow2]=$(dir_bytes "$r")
}

bench_zstd() {
    local r="$REPOS/zstd"
    mkdir -p "$r"
    run zstd gold zstd -1 -T2 -q -f "$IMG/gold.raw" -o "$r/gold.raw.zst"
    GOLD_STORED[zstd]=$(dir_bytes "$r")
}

ALL_TOOLS=(strata restic borg-zstd borg-lz4 casync qcow2 zstd)
declare -A LABEL=([strata]="strata" [restic]="restic (auto)" [borg-zstd]="borg zstd,3"
    [borg-lz4]="borg lz4 (default)" [casync]="casync" [qcow2]="qcow2 + overlays" [zstd]="zstd -1 -T2 (gold)")
RAN=()
for tool in "${ALL_TOOLS[@]}"; do
    [[ " $TOOLS " == *" $tool "* ]] || continue
    log "$tool"
    case $tool in
    strata) bench_strata ;;
    restic) bench_restic ;;
    borg-zstd) bench_borg borg-zstd --compression zstd,3 ;;
    borg-lz4) bench_borg borg-lz4 ;;
    casync) bench_casync ;;
    qcow2) bench_qcow2 ;;
    zstd) bench_zstd ;;
    esac
    RAN+=("$tool")
    [[ $KEEP == 1 ]] || rm -rf "${REPOS:?}/$tool"
done

# ---------------------------------------------------------------- report
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
# ratio A B [FORMAT]: A / B
ratio() { awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (b > 0) printf f, a / b; else printf "-" }'; }
# speed BYTES SECONDS: MB/s
speed() { awk -v b="$1" -v t="$2" 'BEGIN { if (t > 0) printf "%.0f", b / t / 1e6; else printf "-" }'; }
# total ARRAY TOOL IMAGES...: sum of ARRAY[TOOL,IMAGE], "-" if one is missing
total() {
    local -n arr=$1
    local tool=$2 n s=0
    shift 2
    for n in "$@"; do
        [[ -n ${arr[$tool,$n]:-} ]] || { echo -; return; }
        s=$(awk -v a="$s" -v b="${arr[$tool,$n]}" 'BEGIN { printf "%.3f", a + b }')
    done
    echo "$s"
}
# fastest TIME_FN TOOLS...: the tool with the smallest time
fastest() {
    local fn=$1 tool t best="" best_t=""
    shift
    for tool in "$@"; do
        t=$($fn "$tool")
        [[ -n $t && $t != - ]] || continue
        if [[ -z $best_t ]] || awk -v a="$t" -v b="$best_t" 'BEGIN { exit !(a < b) }'; then
            best=$tool best_t=$t
        fi
    done
    echo "$best"
}
gold_wall() { echo "${T[$1,gold]:-}"; }
gold_cpu() { echo "${C[$1,gold]:-}"; }
fleet_wall() { total T "$1" "${IMAGES[@]}"; }
fleet_cpu() { total C "$1" "${IMAGES[@]}"; }

echo
echo "Store benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  ${#IMAGES[@]} images of ${SIZE_MB} MiB: gold, update, ${#USER_NAMES[@]} users"
echo "  gold:   ext4 (mke2fs -d) of files from '$SRC', $(mb "$GOLD_ALLOC") MB allocated of $(mb "$VSIZE") MB"
python3 - "$IMG/update.json" "$IMG/user01.json" "$VSIZE" <<'PY'
import json, sys
u, w, size = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
print(f"  update: {u['replaced_files']} files replaced by {u['replaced_bytes'] / 1e6:.1f} MB of other real files, "
      f"{u['added_files']} new files of {u['added_bytes'] / 1e6:.1f} MB (debugfs -w)")
print(f"  users:  each {w['bytes'] / 1e6:.1f} MB ({100 * w['bytes'] / size:.1f}%) of random data "
      f"in {w['runs']} runs of 4-256 KiB at 4 KiB-aligned random offsets")
PY
echo "  fleet:  $(mb "$FLEET_LOGICAL") MB logical, $(mb "$FLEET_ALLOC") MB allocated, $(mb "$DISTINCT") MB of distinct non-zero 64 KiB blocks"
echo "  limit:  $(mb "$LIMIT_FLEET") MB for the fleet, $(mb "$LIMIT_GOLD") MB for gold (zstd -3 of the distinct non-zero 64 KiB blocks)"
echo "  MB = 10^6 bytes; MB/s logical = virtual size / wall time, alloc = allocated bytes / wall time;"
echo "  cpu = user + sys seconds; stored = all files of the repository"
echo
fmt='%-19s | %7s %7s %7s %7s %8s | %7s %7s %7s %8s %6s\n'
# shellcheck disable=SC2059
printf "$fmt" "" "gold" "" "MB/s" "MB/s" "stored" "fleet" "" "MB/s" "stored" "stored"
# shellcheck disable=SC2059
printf "$fmt" "tool" "wall s" "cpu s" "logical" "alloc" "MB" "wall s" "cpu s" "logical" "MB" "/limit"
for tool in "${RAN[@]}"; do
    g=${T[$tool,gold]}
    fw=$(fleet_wall "$tool")
    if [[ $fw == - ]]; then
        fw_s=- fc_s=- f_speed=- f_stored=- f_ratio=-
    else
        fw_s=$(printf %.1f "$fw")
        fc_s=$(printf %.1f "$(fleet_cpu "$tool")")
        f_speed=$(speed "$FLEET_LOGICAL" "$fw")
        f_stored=$(mb "${FLEET_STORED[$tool]}")
        f_ratio=$(ratio "${FLEET_STORED[$tool]}" "$LIMIT_FLEET")
    fi
    # shellcheck disable=SC2059
    printf "$fmt" "${LABEL[$tool]}" "$(printf %.2f "$g")" "$(printf %.2f "${C[$tool,gold]}")" \
        "$(speed "$VSIZE" "$g")" "$(speed "$GOLD_ALLOC" "$g")" "$(mb "${GOLD_STORED[$tool]}")" \
        "$fw_s" "$fc_s" "$f_speed" "$f_stored" "$f_ratio"
done
# shellcheck disable=SC2059
printf "$fmt" "limit (zstd-3, 64K)" - - - - "$(mb "$LIMIT_GOLD")" - - - "$(mb "$LIMIT_FLEET")" "1.00"

if [[ -n ${T[strata,gold]:-} ]]; then
    echo
    peers=(restic borg-zstd borg-lz4 casync)
    best=$(fastest gold_wall "${peers[@]}")
    if [[ -n $best ]]; then
        sp=$(ratio "${T[$best,gold]}" "${T[strata,gold]}")
        verdict=$(awk -v r="$sp" 'BEGIN { print (r >= 2.0) ? "met" : "NOT met" }')
        echo "strata gold import speed / fastest of restic, borg, casync (${LABEL[$best]}): ${sp}x  (goal >= 2x: $verdict)"
        bc=$(fastest gold_cpu "${peers[@]}")
        echo "  same in CPU time (cheapest peer: ${LABEL[$bc]}): $(ratio "${C[$bc,gold]}" "${C[strata,gold]}")x"
        bf=$(fastest fleet_wall "${peers[@]}")
        echo "strata fleet import speed / fastest peer on the fleet (${LABEL[$bf]}): $(ratio "$(fleet_wall "$bf")" "$(fleet_wall strata)")x"
    fi
    if [[ -n ${T[zstd,gold]:-} ]]; then
        echo "strata gold import speed / zstd -1 -T2 over the raw file: $(ratio "${T[zstd,gold]}" "${T[strata,gold]}")x"
    fi
    if [[ -n ${FLEET_STORED[strata]:-} ]]; then
        r=$(ratio "${FLEET_STORED[strata]}" "$LIMIT_FLEET")
        verdict=$(awk -v r="$r" 'BEGIN { print (r <= 1.1) ? "met" : "NOT met" }')
        echo "strata fleet stored / limit: ${r}x  (goal <= 1.1x: $verdict)"
    fi
fi
