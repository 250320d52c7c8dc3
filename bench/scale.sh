#!/usr/bin/env bash
# Scale benchmark: how many points can one hub serve at a 15-minute check-in
# interval? A script, not a test: it prints a table and exits 0 when every step ran.
#
# One real hub (`strata hub run`, fresh directory, HTTPS on 127.0.0.1 with a
# self-signed certificate, as points reach a hub) and `strata-load`
# (crates/loadgen), which plays N points against it over the real protocol with the
# real client code: each point enrolled, its desktop (an 8 MiB user disk, a copy
# of a template a quarter of whose blocks hold data) created on one channel and
# checked out to it, exactly as `strata hub enroll`, `point enroll`, `desktop
# create --template` and `point desktop start` do; then every point checks in on
# its interval as the agent's sync round does: a local commit of 3 rewritten 64 KiB
# blocks (8 KiB random + 56 KiB text each), a desktop report, `strata_sync::push`
# (compare-and-swap against the hub tip it knew), a second report, and the
# question whether its channel moved (GET /v1/desktops), on a new connection (TLS
# handshake included) as after the 90 s idle timeout of a real point's connection
# pool. Phases are spread uniformly over the interval.
#
# Steps (`strata-load --steps`, all against the same hub; each step sets up only
# the desktops it adds):
#   1. N = BENCH_SCALE_STEPS (default 5000,10000,20000,40000) at the real interval
#      (900 s): the hub holds N desktops and takes N/900 check-ins per second, for
#      BENCH_SCALE_DURATION seconds (default 60) of load each (fewer than 5000
#      points make too few check-ins in a minute for a p99 to mean anything);
#   2. at the largest N: the interval compressed K-fold for K in BENCH_SCALE_SCALES
#      (default 1.25,1.5,2,3), i.e. the check-in rate of N*K points, still with N
#      desktops held, to find where the hub stops keeping up.
# A step passes when no check-in failed and the p99 latency of a check-in (all its
# requests, end to end) is under 1 s. A step that does not pass runs once more
# (after the hub is idle again; both runs are reported), since on a shared machine
# one stall of the disk by another process's writes is enough to fail a minute of
# check-ins; the run stops at the first step whose repeat does not pass either.
# Then the largest N that passed (at its smallest K) runs once more, after the hub
# has gone idle, while `perf` profiles the hub (BENCH_SCALE_PROFILE=0 skips it):
# what its CPU did (perf record, call chains) and its system calls per check-in
# with their latency (perf trace -s). The profilers cost CPU too, so that run is
# slower than the step it repeats. docs/performance.md ("Scale") has the results.
#
# Environment:
#   BENCH_SCALE_STEPS     desktops per step at the real interval (comma separated)
#   BENCH_SCALE_SCALES    time scales tried at the largest N (comma separated, "" = none)
#   BENCH_SCALE_DURATION  seconds of load per step (default 60)
#   BENCH_SCALE_TLS=0     plain HTTP instead of HTTPS
#   BENCH_SCALE_PROFILE=0 no profiled run
#   BENCH_SCALE_NICE      run the hub and strata-load at this nice value (e.g. -10) on a
#                         machine other work shares (default: unchanged)
#   BENCH_DIR             work directory (default /tmp/strata-scale-bench)
#   BENCH_KEEP=1          keep the work directory
#   STRATA_BIN, STRATA_LOAD_BIN  use these binaries instead of building release
#
# Usage: bench/scale.sh                 # about 13 minutes on 2 cores, +5 to build
#        BENCH_SCALE_STEPS=1000,5000 BENCH_SCALE_SCALES=4 BENCH_SCALE_DURATION=30 bench/scale.sh
set -euo pipefail

STEPS=${BENCH_SCALE_STEPS:-5000,10000,20000,40000}
SCALES=${BENCH_SCALE_SCALES-1.25,1.5,2,3}
DURATION=${BENCH_SCALE_DURATION:-60}
TLS=${BENCH_SCALE_TLS:-1}
PROFILE=${BENCH_SCALE_PROFILE:-1}
NICE=${BENCH_SCALE_NICE:-}
BENCH_DIR=${BENCH_DIR:-/tmp/strata-scale-bench}
KEEP=${BENCH_KEEP:-0}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'scale.sh: %s\n' "$*" >&2; exit 1; }

[[ $STEPS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "BENCH_SCALE_STEPS must be numbers separated by commas"
[[ -z $SCALES || $SCALES =~ ^[0-9.]+(,[0-9.]+)*$ ]] || die "BENCH_SCALE_SCALES must be numbers separated by commas"
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 5 ]] || die "BENCH_SCALE_DURATION must be a number >= 5"
[[ -z $NICE || $NICE =~ ^-?[0-9]+$ ]] || die "BENCH_SCALE_NICE must be a number"
RUN=()
[[ -n $NICE ]] && RUN=(nice -n "$NICE")

HUB_PID=
cleanup() {
    local rc=$?
    if [[ -n $HUB_PID ]] && kill -0 "$HUB_PID" 2>/dev/null; then
        kill "$HUB_PID" 2>/dev/null || true
        wait "$HUB_PID" 2>/dev/null || true
    fi
    if [[ $KEEP != 1 ]]; then
        rm -rf "$BENCH_DIR"
    else
        log "work files kept in $BENCH_DIR"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR/bin"

# ---- binaries: a private copy, so a rebuild during the run changes nothing --------
if [[ -n ${STRATA_BIN:-} && -n ${STRATA_LOAD_BIN:-} ]]; then
    cp "$STRATA_BIN" "$BENCH_DIR/bin/strata"
    cp "$STRATA_LOAD_BIN" "$BENCH_DIR/bin/strata-load"
else
    log "building strata and strata-load (release)"
    (cd "$ROOT" && cargo build --release -q -p strata-cli -p strata-loadgen)
    cp "$ROOT/target/release/strata" "$ROOT/target/release/strata-load" "$BENCH_DIR/bin/"
fi
STRATA=$BENCH_DIR/bin/strata
LOAD=$BENCH_DIR/bin/strata-load

# ---- the hub ----------------------------------------------------------------------
HUB=$BENCH_DIR/hub
"$STRATA" hub init "$HUB" >/dev/null
TLS_ARGS=()
LOAD_TLS=()
if [[ $TLS == 1 ]]; then
    command -v openssl >/dev/null || die "openssl is needed for BENCH_SCALE_TLS=1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$BENCH_DIR/key.pem" -out "$BENCH_DIR/cert.pem" -days 2 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE 2>/dev/null
    TLS_ARGS=(--tls-cert "$BENCH_DIR/cert.pem" --tls-key "$BENCH_DIR/key.pem")
    LOAD_TLS=(--ca "$BENCH_DIR/cert.pem")
fi
"${RUN[@]}" "$STRATA" hub run "$HUB" --listen 127.0.0.1:0 "${TLS_ARGS[@]}" >"$BENCH_DIR/hub.log" 2>&1 &
HUB_PID=$!
for _ in $(seq 100); do
    [[ -s $HUB/hub.url ]] && break
    kill -0 "$HUB_PID" 2>/dev/null || die "the hub exited: $(cat "$BENCH_DIR/hub.log")"
    sleep 0.1
done
[[ -s $HUB/hub.url ]] || die "the hub did not start"
log "hub $(cat "$HUB/hub.url") (pid $HUB_PID)"

# ---- steps ------------------------------------------------------------------------
MAXN=${STEPS##*,}
ALL=$STEPS
if [[ -n $SCALES ]]; then
    IFS=, read -ra KS <<<"$SCALES"
    for k in "${KS[@]}"; do ALL+=",${MAXN}x$k"; done
fi

PROFILE_ARGS=()
if [[ $PROFILE == 1 ]]; then
    command -v perf >/dev/null || { log "no perf: installing linux-perf"; apt-get install -y -q linux-perf >/dev/null 2>&1 || true; }
    if command -v perf >/dev/null; then
        # Profile the middle of the load phase: past its start, before its tail.
        cat >"$BENCH_DIR/profile.sh" <<EOF
#!/usr/bin/env bash
set -u
d=\$(( STRATA_LOAD_DURATION * 2 / 3 ))
sleep \$(( STRATA_LOAD_DURATION / 6 ))
t=\$(( d < 30 ? d / 3 : 10 ))
perf trace -s -p "\$STRATA_LOAD_HUB_PID" -o "$BENCH_DIR/perf-trace.txt" -- sleep "\$t" &
perf record -q -e cpu-clock -F 199 --call-graph dwarf,16384 -p "\$STRATA_LOAD_HUB_PID" \\
    -o "$BENCH_DIR/perf.data" -- sleep "\$d" >"$BENCH_DIR/perf-record.log" 2>&1
wait
echo "\$t" >"$BENCH_DIR/perf-seconds"
EOF
        chmod +x "$BENCH_DIR/profile.sh"
        PROFILE_ARGS=(--profile-hook "$BENCH_DIR/profile.sh")
    else
        log "perf is not available: no profile"
    fi
fi

log "steps: $ALL (interval 900 s, $DURATION s of load each)"
uptime >&2
"${RUN[@]}" "$LOAD" --hub-dir "$HUB" --hub-pid "$HUB_PID" "${LOAD_TLS[@]}" \
    --steps "$ALL" --interval 900 --duration "$DURATION" --stop-on-fail --retry-failed 1 \
    --json-out "$BENCH_DIR/scale.json" "${PROFILE_ARGS[@]}" | tee "$BENCH_DIR/table.txt"
uptime >&2

kill -0 "$HUB_PID" 2>/dev/null || die "the hub died during the run: $(tail -5 "$BENCH_DIR/hub.log")"

# ---- where the hub's time went -------------------------------------------------------
if [[ -s $BENCH_DIR/perf.data ]]; then
    log "profile of the hub during the profiled run"
    # --no-inline: symbolising inlined frames takes minutes; function names suffice.
    perf script --no-inline -i "$BENCH_DIR/perf.data" -F tid,period,ip,sym,dso \
        >"$BENCH_DIR/perf-script.txt" 2>/dev/null || true
    python3 - "$BENCH_DIR" <<'PY' | tee "$BENCH_DIR/profile.txt"
import json, re, sys, collections
d = sys.argv[1]
rep = json.load(open(f"{d}/scale.json"))
prof = rep.get("profiled") or {}
rate = prof.get("checkins_per_s") or 0
samples, cur = [], None
for line in open(f"{d}/perf-script.txt", errors="replace"):
    if not line.strip():
        continue
    if not line[0].isspace():
        cur = []
        samples.append(cur)
    elif cur is not None:
        m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if m:
            cur.append((m.group(1), m.group(2)))
n = len(samples)
if n == 0:
    print("no samples")
    sys.exit(0)
# What each on-CPU sample of the hub was doing: the first rule matching its call
# chain (leaf to root) wins, so the shares add up to 100%.
rules = [
    ("TLS handshakes (a new connection per check-in)", lambda c, k: re.search(r"MidHandshake|ExpectClientHello|ExpectFinished|emit_server_hello|emit_certificate|emit_certificate_verify|ring::ec::|agreement::|ecdsa|p256|x25519", c)),
    ("fsync and fdatasync (kernel)", lambda c, k: re.search(r"\bfsync|fdatasync|ext4_sync_file|jbd2|file_write_and_wait|blkdev_issue_flush", c)),
    ("SQLite: compiling statements (no statement cache)", lambda c, k: re.search(r"sqlite3Prepare|sqlite3RunParser|sqlite3LockAndPrepare|InnerConnection::prepare", c)),
    ("SQLite: running statements, WAL", lambda c, k: re.search(r"sqlite3|rusqlite", c)),
    ("zstd (upload streams, pack entries, deltas)", lambda c, k: re.search(r"ZSTD_|zstd|HUF_|FSE_", c)),
    ("BLAKE3 (checking received objects)", lambda c, k: re.search(r"blake3", c)),
    ("TLS records (encryption)", lambda c, k: re.search(r"rustls|ring::|ring_core|aes_|gcm_|chacha", c)),
    ("futex, scheduling (threads handing over locks)", lambda c, k: k and re.search(r"futex|schedule|finish_task_switch|try_to_wake_up|sched_yield", c)),
    ("network (loopback TCP)", lambda c, k: k and re.search(r"tcp_|inet_|sock_|__sys_(send|recv)|ip_|skb|loopback|net_rx", c)),
    ("file system (open, write, rename, read)", lambda c, k: k and re.search(r"ext4|vfs_|filemap|do_sys_open|path_openat|rename|generic_perform_write|do_filp_open", c)),
    ("memory (malloc, memcpy, page faults)", lambda c, k: re.search(r"malloc|free|memcpy|memmove|memset|realloc|_int_|page_fault|clear_page", c)),
    ("HTTP (hyper, axum)", lambda c, k: re.search(r"hyper|h2::|axum|http::", c)),
    ("JSON", lambda c, k: re.search(r"serde_json", c)),
    ("tokio runtime", lambda c, k: re.search(r"tokio::", c)),
]
by_rule = collections.Counter()
for s in samples:
    chain = " | ".join(sym for sym, _ in s)
    kernel = bool(s) and "kernel" in s[0][1]
    for name, f in rules:
        if f(chain, kernel):
            by_rule[name] += 1
            break
    else:
        by_rule["other (" + ("kernel" if kernel else "user") + ")"] += 1
cpu_ms = (prof.get("hub") or {}).get("cpu_ms_per_checkin", 0)
print(f"\nhub on-CPU samples: {n}; {cpu_ms:.1f} ms of hub CPU per check-in in this run")
print("what the hub's CPU did (first match on the call chain; % of samples, ms per check-in):")
for k, v in by_rule.most_common():
    print(f"  {100 * v / n:5.1f}%  {cpu_ms * v / n:5.1f} ms  {k}")
# Which parts of the hub the samples were in (inclusive: a sample counts for each).
parts = [
    ("metadata database (hub.sqlite: auth, desktops, reports, audit)", r"strata_hub::db::"),
    ("  of which bearer-credential checks (every request)", r"strata_hub::routes::Caller|from_request_parts|point_by_credential|touch_point"),
    ("store catalog (catalog.sqlite)", r"strata_store::catalog::"),
    ("upload sessions: receiving objects (add_received)", r"WriteSession::add_received"),
    ("writing packs (flush: one pack per upload request)", r"WriteSession::flush_pack|PackWriter::"),
    ("commit: publish the version, move main", r"WriteSession::commit_received|WriteSession::publish"),
    ("restore points (tag, prune)", r"strata_hub::desktops::after_main_moved|strata_hub::retention::"),
    ("desktop listing (the channel question)", r"strata_hub::desktops::(detail|info|list)"),
    ("reading objects (delta bases, version records)", r"Store::read_object|Store::read_objects|Store::load_version"),
]
print("\nwhere in the hub (inclusive: a sample counts for each part on its call chain):")
for name, rx in parts:
    v = sum(1 for s in samples if re.search(rx, " | ".join(sym for sym, _ in s)))
    print(f"  {100 * v / n:5.1f}%  {name}")
# System calls during the profile window.
try:
    secs = float(open(f"{d}/perf-seconds").read())
    tot = collections.defaultdict(lambda: [0, 0.0])
    for line in open(f"{d}/perf-trace.txt"):
        m = re.match(r"\s+(\w+)\s+(\d+)\s+\d+\s+([\d.]+)\s+[\d.]+\s+([\d.]+)", line)
        if m:
            tot[m.group(1)][0] += int(m.group(2))
            tot[m.group(1)][1] += float(m.group(3))
    if rate and tot:
        print(f"\nhub system calls per check-in ({rate:.1f} check-ins/s, {secs:.0f} s window; "
              "futex and epoll_wait times include idle threads):")
        for k in ["fsync", "fdatasync", "openat", "rename", "unlink", "pwrite64", "pread64",
                  "write", "writev", "recvfrom", "fcntl", "futex", "sched_yield", "accept4"]:
            c, t = tot.get(k, (0, 0.0))
            print(f"  {c / secs / rate:7.1f} calls  {t / max(c, 1):7.3f} ms avg  {k}")
except FileNotFoundError:
    pass
PY
fi

# ---- summary ------------------------------------------------------------------------
python3 - "$BENCH_DIR/scale.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print()
print("| desktops | K | rate of (points at 900 s) | check-ins/s | p50 ms | p90 ms | p99 ms | max ms | failed | hub CPU | hub CPU ms/check-in | hub peak RSS MiB | store MB | packs | tool CPU | machine CPU | pass |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
rows = list(r["steps"])
if r.get("profiled"):
    rows.append(dict(r["profiled"], profiled=True))
for s in rows:
    h = s.get("hub") or {}
    st = s.get("store") or {}
    l = s["latency_ms"]
    tag = " (profiled)" if s.get("profiled") else (" (repeat)" if s.get("attempt", 1) > 1 else "")
    print(f"| {s['points']}{tag} | {s['time_scale']:g} | {s['equivalent_points']:.0f} | {s['checkins_per_s']:.1f} "
          f"| {l['p50']:.0f} | {l['p90']:.0f} | {l['p99']:.0f} | {l['max']:.0f} | {s['failures']} "
          f"| {h.get('cpu_percent', 0):.0f}% | {h.get('cpu_ms_per_checkin', 0):.1f} | {h.get('peak_rss_mib', 0):.0f} "
          f"| {(st.get('store_bytes', 0) + st.get('meta_bytes', 0)) / 1e6:.0f} | {st.get('packs', 0)} | {s['tool_cpu_percent']:.0f}% | {s.get('machine_cpu_percent') or 0:.0f}% | {'yes' if s['pass'] else 'no'} |")
setups = [s["setup"] for s in r["steps"] if s["setup"]["added"]]
if setups:
    n = sum(s["added"] for s in setups)
    t = sum(s["seconds"] for s in setups)
    print(f"\nsetup: {n} desktops in {t:.0f} s ({n / t:.0f}/s: enrolment token, enrolment, desktop create, check-out each)")
lp = r.get("largest_pass")
if lp:
    n, k = lp
    print(f"largest passing step: {n} desktops held at the real 900 s interval"
          + (f", and the check-in rate of {n * k:.0f} points (K={k:g})" if k > 1 else ""))
else:
    print("no step passed")
PY
