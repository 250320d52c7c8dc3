#!/usr/bin/env python3
"""Helpers for bench/transfer.sh: a byte-counting TCP proxy, a keep-alive HTTP file
server, and casync index arithmetic.

Subcommands:

  proxy --upstream HOST:PORT --port-file FILE
      Listen on two loopback ports: a data port that forwards every connection to
      HOST:PORT and counts the bytes it forwards each way, and a control port that
      answers each connection with one line "TO_UPSTREAM TO_CLIENT CONNECTIONS" (the
      totals so far) and closes. Writes "DATA_PORT CONTROL_PORT" to FILE when ready.
      The counts are TCP payload bytes: everything the applications wrote to their
      sockets (HTTP headers and bodies, rsync protocol), not TCP/IP headers.

  serve --dir DIR --port-file FILE
      Serve DIR over HTTP/1.1 with keep-alive on a loopback port (written to FILE):
      casync's HTTP helper (curl) reuses one connection for all its chunk requests,
      as it would against a real web server.

  casync-need --index NEW.caibx --seed-index OLD.caibx --store STORE
      What `casync extract --seed=OLD` of NEW must fetch: the distinct chunks of NEW
      that OLD's index lacks (a seed yields exactly the chunks of its own index when it
      is chunked with the same parameters), with the sum of their compressed sizes in
      STORE, plus the size of NEW.caibx. Prints JSON.

  delta-model --old OLD.raw --new NEW.raw [--block-size 65536]
      A model of what a pull of NEW by a receiver holding OLD costs in strata's
      scheme and in alternatives, from the images alone (needs the Python zstandard
      module). The blocks sent are those of NEW that differ from OLD's block at the
      same place and whose content OLD does not hold as an aligned block (dedup).
      Prints, in bytes, the zstd-3 stream of those blocks (flushed every MiB, as the
      hub does) when each is sent
        raw_stream          raw;
        strata_rule_stream  as a delta against OLD's block at the same place when
                            the delta plus 36 bytes is smaller than the raw block
                            (the hub's rule today), raw otherwise;
        alt_rule_stream     as such a delta only when it is smaller than 0.8x the
                            block compressed alone, raw (in the stream) otherwise;
        literal_stream      only the 4 KiB pages that are neither unchanged in place
                            nor found at any 4 KiB-aligned place of OLD (a floor for
                            a hub that matches pages against the whole base version);
        batch_same_place    batches of 64 blocks (the hub's download step), each one
                            zstd frame with OLD's blocks at the same places as its
                            prefix (a delta per batch instead of per block);
        batch_pages         the same, the prefix also holding the blocks of OLD in
                            which the batch's changed pages are found (at most
                            12 MiB of prefix, window 16 MiB, zstd level 3 with
                            its hash tables at 2^22 entries).
"""

import argparse
import asyncio
import functools
import http.server
import json
import os
import socketserver
import struct
import sys

# ---------------------------------------------------------------- proxy


class Counters:
    def __init__(self):
        self.up = 0
        self.down = 0
        self.conns = 0


async def pump(reader, writer, counters, attr):
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            setattr(counters, attr, getattr(counters, attr) + len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass


async def proxy_main(a):
    host, port = a.upstream.rsplit(":", 1)
    counters = Counters()

    async def on_client(creader, cwriter):
        counters.conns += 1
        try:
            ureader, uwriter = await asyncio.open_connection(host, int(port))
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, uwriter, counters, "up"),
                             pump(ureader, cwriter, counters, "down"))
        for w in (cwriter, uwriter):
            try:
                w.close()
            except (ConnectionError, OSError):
                pass

    async def on_control(reader, writer):
        writer.write(f"{counters.up} {counters.down} {counters.conns}\n".encode())
        try:
            await writer.drain()
        finally:
            writer.close()

    data = await asyncio.start_server(on_client, "127.0.0.1", 0)
    ctl = await asyncio.start_server(on_control, "127.0.0.1", 0)
    dport = data.sockets[0].getsockname()[1]
    cport = ctl.sockets[0].getsockname()[1]
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{dport} {cport}\n")
    os.rename(tmp, a.port_file)
    async with data, ctl:
        await asyncio.gather(data.serve_forever(), ctl.serve_forever())


def cmd_proxy(a):
    try:
        asyncio.run(proxy_main(a))
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- HTTP server


class Quiet(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def cmd_serve(a):
    handler = functools.partial(Quiet, directory=a.dir)
    srv = Server(("127.0.0.1", 0), handler)
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{srv.server_address[1]}\n")
    os.rename(tmp, a.port_file)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- casync

CA_FORMAT_INDEX = 0x96824D9C7B129FF9
CA_FORMAT_TABLE = 0xE75B9E112F17417D


def caibx_chunks(path):
    """(end offset, chunk id) of every chunk of a casync blob index (.caibx)."""
    with open(path, "rb") as f:
        data = f.read()
    size, typ = struct.unpack_from("<QQ", data, 0)
    if typ != CA_FORMAT_INDEX:
        raise SystemExit(f"{path}: not a casync index")
    pos = size
    tsize, ttyp = struct.unpack_from("<QQ", data, pos)
    if ttyp != CA_FORMAT_TABLE:
        raise SystemExit(f"{path}: no table after the index header")
    pos += 16
    out = []
    while pos + 40 <= len(data):
        off = struct.unpack_from("<Q", data, pos)[0]
        if off == 0:  # the table's tail (zero fill, then offsets and a marker)
            break
        out.append((off, data[pos + 8:pos + 40]))
        pos += 40
    return out


def cmd_casync_need(a):
    new = caibx_chunks(a.index)
    old = {c for _, c in caibx_chunks(a.seed_index)}
    need, need_bytes, raw_bytes, prev = set(), 0, 0, 0
    for end, c in new:
        length = end - prev
        prev = end
        if c in old or c in need:
            continue
        need.add(c)
        h = c.hex()
        need_bytes += os.path.getsize(os.path.join(a.store, h[:4], h + ".cacnk"))
        raw_bytes += length
    idx = os.path.getsize(a.index)
    print(json.dumps({
        "chunks": len(new),
        "distinct_chunks": len({c for _, c in new}),
        "needed_chunks": len(need),
        "needed_raw_bytes": raw_bytes,
        "needed_chunk_bytes": need_bytes,
        "index_bytes": idx,
        "total": need_bytes + idx,
    }))


def cmd_delta_model(a):
    import hashlib

    import zstandard as zstd

    bs, pg = a.block_size, 4096
    fo = os.open(a.old, os.O_RDONLY)
    fn = os.open(a.new, os.O_RDONLY)
    old_size, size = os.path.getsize(a.old), os.path.getsize(a.new)
    digest = lambda b: hashlib.blake2b(b, digest_size=16).digest()
    pages, blocks = {}, set()
    for off in range(0, old_size, 1 << 20):
        buf = os.pread(fo, 1 << 20, off)
        for i in range(0, len(buf), bs):
            blocks.add(digest(buf[i:i + bs]))
        for i in range(0, len(buf), pg):
            p = buf[i:i + pg]
            if p.count(0) != len(p):
                pages.setdefault(digest(p), (off + i) // bs)

    sent, seen, deduplicated = [], set(), 0
    for b in range(size // bs):
        nb, ob = os.pread(fn, bs, b * bs), os.pread(fo, bs, b * bs)
        if nb == ob:
            continue
        h = digest(nb)
        if h in blocks or h in seen:
            deduplicated += 1
            continue
        seen.add(h)
        sent.append((ob, nb, b))

    def stream(items):
        c = zstd.ZstdCompressor(level=3).compressobj()
        out = pending = 0
        for x in items:
            out += len(c.compress(x))
            pending += len(x)
            if pending >= 1 << 20:
                out += len(c.flush(zstd.COMPRESSOBJ_FLUSH_BLOCK))
                pending = 0
        return out + len(c.flush())

    def delta(ob, nb):
        d = zstd.ZstdCompressionDict(ob, dict_type=zstd.DICT_TYPE_RAWCONTENT)
        return zstd.ZstdCompressor(level=3, dict_data=d).compress(nb)

    alone = zstd.ZstdCompressor(level=3)
    strata, alt, lit, suppliers = [], [], [], []
    n_strata = n_alt = same_place = elsewhere = 0
    for ob, nb, b in sent:
        d = delta(ob, nb) if ob.count(0) != len(ob) else None
        use = d is not None and len(d) + 36 < len(nb)
        strata.append(d if use else nb)
        n_strata += use
        use = d is not None and len(d) < 0.8 * len(alone.compress(nb))
        alt.append(d if use else nb)
        n_alt += use
        out, sup = bytearray(), []
        for i in range(0, bs, pg):
            p = nb[i:i + pg]
            if p == ob[i:i + pg]:
                same_place += 1
            elif p.count(0) == len(p):
                elsewhere += 1
            elif digest(p) in pages:
                elsewhere += 1
                sup.append(pages[digest(p)])
            else:
                out += p
        lit.append(bytes(out))
        suppliers.append(sup)

    def batches(with_pages):
        total, max_prefix = 0, (12 << 20) // bs
        # Level 3's tables (hash_log 17) keep too few positions of a prefix of many
        # MiB to find its matches; sized to the window they do.
        params = zstd.ZstdCompressionParameters.from_level(3, window_log=24, hash_log=22,
                                                           chain_log=22)
        for k in range(0, len(sent), 64):
            part = sent[k:k + 64]
            order = [b for _, _, b in part]
            if with_pages:
                counts = {}
                for sup in suppliers[k:k + 64]:
                    for x in sup:
                        counts[x] = counts.get(x, 0) + 1
                order += sorted(counts, key=lambda x: -counts[x])
            chosen, seen_b = [], set()
            for x in order:
                if x not in seen_b and len(chosen) < max_prefix:
                    seen_b.add(x)
                    chosen.append(x)
            prefix = b"".join(os.pread(fo, bs, x * bs) for x in chosen)
            data = b"".join(nb for _, nb, _ in part)
            if prefix.count(0) == len(prefix):
                total += len(zstd.ZstdCompressor(compression_params=params).compress(data))
                continue
            d = zstd.ZstdCompressionDict(prefix, dict_type=zstd.DICT_TYPE_RAWCONTENT)
            total += len(zstd.ZstdCompressor(dict_data=d, compression_params=params).compress(data))
        return total
    print(json.dumps({
        "blocks_sent": len(sent),
        "blocks_changed_but_deduplicated": deduplicated,
        "raw_bytes": sum(len(nb) for _, nb, _ in sent),
        "raw_stream": stream(nb for _, nb, _ in sent),
        "strata_rule_deltas": n_strata,
        "strata_rule_stream": stream(strata),
        "alt_rule_deltas": n_alt,
        "alt_rule_stream": stream(alt),
        "pages_unchanged_in_place": same_place,
        "pages_found_elsewhere_in_old_or_zero": elsewhere,
        "literal_bytes": sum(map(len, lit)),
        "literal_stream": stream(lit),
        "batch_same_place": batches(False),
        "batch_pages": batches(True),
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    s = sp.add_parser("proxy")
    s.add_argument("--upstream", required=True)
    s.add_argument("--port-file", required=True)
    s = sp.add_parser("serve")
    s.add_argument("--dir", required=True)
    s.add_argument("--port-file", required=True)
    s = sp.add_parser("casync-need")
    s.add_argument("--index", required=True)
    s.add_argument("--seed-index", required=True)
    s.add_argument("--store", required=True)
    s = sp.add_parser("delta-model")
    s.add_argument("--old", required=True)
    s.add_argument("--new", required=True)
    s.add_argument("--block-size", type=int, default=65536)
    a = ap.parse_args()
    {"proxy": cmd_proxy, "serve": cmd_serve, "casync-need": cmd_casync_need,
     "delta-model": cmd_delta_model}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
