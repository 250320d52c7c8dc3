#!/usr/bin/env python3
"""Data generation and the size limit for bench/store.sh.

Subcommands (all deterministic for a given seed):

  stage --dest DIR --budget BYTES --pool FILE SRC...
      Copy a random selection of the regular files (and the symlinks) under the
      SRC directories into DIR, keeping their paths (DIR/usr/..., DIR/var/lib/...),
      until the selected files fill BYTES (counted in 4 KiB blocks). The regular
      files that were not selected are listed in FILE ("size<TAB>path" lines): they
      are the real-file content for the update.

  update-cmds --stage DIR --pool FILE --replace BYTES --add BYTES --out FILE
      Write a debugfs command script that replaces files of the staged tree that
      fill about BYTES (each by a not-selected real file of about the same size:
      "a new build of the same file") and adds new files of about --add BYTES under
      /opt/bench-update/. Run it with `debugfs -w -f FILE COPY_OF_GOLD`: unchanged
      blocks stay where they are, as on a real updated system.

  user-changes --image IMG --fraction F --seed N [--qemu-io-dir DIR]
      Rewrite about F of the image's bytes in place with random data, in runs of
      1 to 64 4 KiB blocks at random 4 KiB-aligned offsets (a file system's writes).
      With --qemu-io-dir, also write each run's data to a file there and a qemu-io
      command script DIR/cmds that writes the same changes into a qcow2 overlay.

  limit --block-size N IMG...
      Sum of the zstd-3 compressed sizes of the distinct non-zero N-byte blocks (at
      N-aligned offsets) of all the images. Prints JSON with the figure after the
      first image ("first") and after all of them ("all").
"""

import argparse
import bisect
import json
import os
import random
import re
import shutil
import stat
import sys

BLK = 4096
SAFE = re.compile(r"^[A-Za-z0-9._+@,=~-]+$")


def safe_path(p):
    """True if every component of `p` can go into a debugfs command unquoted-safe."""
    return all(SAFE.match(c) for c in p.strip("/").split("/"))


def blocks(n):
    return (n + BLK - 1) // BLK * BLK


def walk_files(srcs):
    """(path, size, is_symlink) of the regular files and symlinks, sorted by path."""
    out = []
    for src in srcs:
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for name in files:
                p = os.path.join(root, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    out.append((p, 0, True))
                elif stat.S_ISREG(st.st_mode) and os.access(p, os.R_OK):
                    out.append((p, st.st_size, False))
    out.sort()
    return out


def cmd_stage(a):
    files = walk_files(a.src)
    regular = [f for f in files if not f[2]]
    # No single file may dominate a small image.
    cap = max(a.budget // 16, 1 << 20)
    rng = random.Random(a.seed)
    order = list(range(len(regular)))
    rng.shuffle(order)
    chosen, used = set(), 0
    for i in order:
        p, size, _ = regular[i]
        if size > cap:
            continue
        if used + blocks(size) > a.budget:
            continue
        chosen.add(p)
        used += blocks(size)
        if used >= a.budget - BLK:
            break
    # Symlinks of the chosen directories come along (they cost an inode each).
    chosen_dirs = {os.path.dirname(p) for p in chosen}
    n_files = n_links = 0
    for p, size, is_link in files:
        rel = os.path.relpath(p, "/")
        dst = os.path.join(a.dest, rel)
        if is_link:
            if os.path.dirname(p) not in chosen_dirs:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.symlink(os.readlink(p), dst)
                n_links += 1
            except OSError:
                pass
        elif p in chosen:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                shutil.copyfile(p, dst)
                os.chmod(dst, os.lstat(p).st_mode & 0o7777)
                n_files += 1
            except OSError:
                continue
    with open(a.pool, "w") as f:
        for p, size, is_link in regular:
            if p not in chosen and safe_path(p) and 0 < size <= cap:
                f.write(f"{size}\t{p}\n")
    n_dirs = sum(len(d) for _, d, _ in os.walk(a.dest))
    print(json.dumps({"files": n_files, "symlinks": n_links, "dirs": n_dirs, "bytes": used}))


def load_pool(path):
    pool = []
    with open(path) as f:
        for line in f:
            size, p = line.rstrip("\n").split("\t", 1)
            pool.append((int(size), p))
    pool.sort()
    return pool


def take_near(pool, size):
    """Remove and return the pool file whose size is nearest to `size`."""
    if not pool:
        return None
    i = bisect.bisect_left(pool, (size, ""))
    cands = [j for j in (i - 1, i) if 0 <= j < len(pool)]
    j = min(cands, key=lambda k: abs(pool[k][0] - size))
    return pool.pop(j)


def q(s):
    return '"' + s + '"'


def cmd_update_cmds(a):
    rng = random.Random(a.seed)
    pool = load_pool(a.pool)
    staged = []
    for root, dirs, files in os.walk(a.stage):
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, a.stage)
            if stat.S_ISREG(st.st_mode) and st.st_size >= 16384 and safe_path(rel):
                staged.append((rel, st.st_size))
    staged.sort()
    rng.shuffle(staged)
    cmds, replaced, added, n_rep, n_add = [], 0, 0, 0, 0
    for rel, size in staged:
        if replaced >= a.replace:
            break
        new = take_near(pool, size)
        if new is None:
            break
        d, name = os.path.split("/" + rel)
        cmds += [f"cd {q(d)}", f"rm {q(name)}", f"write {q(new[1])} {q(name)}"]
        replaced += new[0]
        n_rep += 1
    cmds += ["cd /", "mkdir opt", "mkdir opt/bench-update"]
    rng.shuffle(pool)
    sub = -1
    for size, p in pool:
        if added >= a.add:
            break
        if size > max(a.add - added, BLK) * 2:
            continue
        if n_add % 200 == 0:
            sub += 1
            cmds += ["cd /opt/bench-update", f"mkdir d{sub:03}", f"cd d{sub:03}"]
        cmds.append(f"write {q(p)} {q(f'f{n_add:05}-' + os.path.basename(p))}")
        added += size
        n_add += 1
    with open(a.out, "w") as f:
        f.write("\n".join(cmds) + "\n")
    print(json.dumps({"replaced_files": n_rep, "replaced_bytes": replaced,
                      "added_files": n_add, "added_bytes": added}))


def cmd_user_changes(a):
    rng = random.Random(a.seed)
    size = os.path.getsize(a.image)
    nblk = size // BLK
    target = int(size * a.fraction)
    done, runs = 0, []
    while done < target:
        n = min(rng.randint(1, 64), (target - done + BLK - 1) // BLK)
        start = rng.randrange(0, nblk - n + 1)
        runs.append((start * BLK, rng.randbytes(n * BLK)))
        done += n * BLK
    fd = os.open(a.image, os.O_WRONLY)
    try:
        for off, data in runs:
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    if a.qemu_io_dir:
        os.makedirs(a.qemu_io_dir, exist_ok=True)
        with open(os.path.join(a.qemu_io_dir, "cmds"), "w") as c:
            for k, (off, data) in enumerate(runs):
                path = os.path.join(os.path.abspath(a.qemu_io_dir), f"r{k:05}.bin")
                with open(path, "wb") as f:
                    f.write(data)
                c.write(f"write -q -s {path} {off} {len(data)}\n")
    print(json.dumps({"runs": len(runs), "bytes": done}))


SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def data_ranges(fd, size):
    """Data extents of a (possibly sparse) file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, SEEK_HOLE)
        yield start, end
        pos = end


def cmd_limit(a):
    import blake3
    import zstandard

    bs = a.block_size
    zero = bytes(bs)
    cctx = zstandard.ZstdCompressor(level=3)
    seen = set()
    total = 0
    distinct_raw = 0
    out = {}
    for idx, path in enumerate(a.images):
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            last = -1
            for start, end in data_ranges(fd, size):
                b = max(start // bs, last + 1)
                while b * bs < end:
                    block = os.pread(fd, bs, b * bs)
                    last = b
                    b += 1
                    if len(block) < bs:
                        block = block + bytes(bs - len(block))
                    if block == zero:
                        continue
                    h = blake3.blake3(block).digest()
                    if h in seen:
                        continue
                    seen.add(h)
                    distinct_raw += bs
                    total += len(cctx.compress(block))
        finally:
            os.close(fd)
        if idx == 0:
            out["first"] = total
            out["first_distinct_bytes"] = distinct_raw
    out["all"] = total
    out["all_distinct_bytes"] = distinct_raw
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("stage")
    s.add_argument("--dest", required=True)
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--pool", required=True)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("src", nargs="+")
    s = sp.add_parser("update-cmds")
    s.add_argument("--stage", required=True)
    s.add_argument("--pool", required=True)
    s.add_argument("--replace", type=int, required=True)
    s.add_argument("--add", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=2)
    s = sp.add_parser("user-changes")
    s.add_argument("--image", required=True)
    s.add_argument("--fraction", type=float, default=0.015)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--qemu-io-dir")
    s = sp.add_parser("limit")
    s.add_argument("--block-size", type=int, default=65536)
    s.add_argument("images", nargs="+")
    a = ap.parse_args()
    {"stage": cmd_stage, "update-cmds": cmd_update_cmds,
     "user-changes": cmd_user_changes, "limit": cmd_limit}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
