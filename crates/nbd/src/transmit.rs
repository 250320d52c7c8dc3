//! The transmission phase: requests are read continuously, carried out concurrently on
//! blocking threads, and answered as they complete.
//!
//! Hot reads skip the thread hop: a read the disk can answer at once (from memory or
//! the page cache, see [`Disk::try_read_at`]) is answered by the connection's task
//! itself. Handing a 4 KiB read to a blocking thread and its reply back costs two
//! thread wake-ups — several times the read itself — and capped random reads at a
//! quarter of what the same task does alone. Anything that would wait (a block to
//! decode, a page to fetch from the device, a lock held by a writer) still goes to a
//! blocking thread, so the event loop never stalls on I/O.
//!
//! Back-pressure: before a request's payload is read, the reader takes a permit for
//! the request and for the bytes it will hold (its payload, or the data of its reply)
//! from two per-connection semaphores; the permits travel with the reply and are
//! returned only once the reply has been written to the socket. A client that sends
//! requests without reading replies therefore stalls its own reader once the budget
//! is spent, and the kernel's socket buffers push back on it: memory stays bounded.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use strata_block::{Disk, DiskExtent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::handshake::Negotiated;
use crate::proto::*;
use crate::server::Inner;

/// A reply on its way to the socket, with the budget it holds.
struct Outgoing {
    parts: Vec<Vec<u8>>,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

/// Largest read answered on the connection's task when the disk can answer it at
/// once. Larger ones are copied on blocking threads: there the copies of a client's
/// several big reads run in parallel (on 2 cores, 1 MiB sequential reads at queue
/// depth 4 ran at 1,000-1,100 MB/s inline against 1,500-1,700 MB/s on threads, with
/// the break-even near 128 KiB), and one client's big reads do not hold up the
/// other connections served by the same worker.
const INLINE_READ_MAX: u32 = 128 << 10;

/// Bytes a block status reply may hold.
const STATUS_COST: u32 = (MAX_STATUS_DESCRIPTORS * 8 + 64) as u32;

/// Bytes of memory a request may pin until its reply is written.
fn cost(req: &Request, verdict: Verdict) -> u32 {
    match (req.command, verdict) {
        (Command::Write, _) => req.length,
        (Command::Read, Verdict::Execute) => req.length,
        (Command::BlockStatus, Verdict::Execute) => STATUS_COST,
        _ => 0,
    }
}

pub(crate) async fn transmit<S>(
    inner: Arc<Inner>,
    negotiated: Negotiated<S>,
    mut shutdown: watch::Receiver<bool>,
    peer: &str,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Negotiated {
        stream,
        export,
        structured,
        allocation_context,
    } = negotiated;
    let disk = export.disk;
    let params = TransmissionParams {
        size: disk.size(),
        read_only: disk.read_only(),
        structured,
        allocation_context,
        fast_zero: disk.fast_zero(),
    };
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(128 * 1024, rd);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let (dead_tx, mut dead) = watch::channel(false);
    let writer = tokio::spawn(write_replies(wr, rx, dead_tx));

    let cfg = &inner.config;
    let requests = Arc::new(Semaphore::new(cfg.max_in_flight_requests.max(1)));
    // Any single request must fit in the budget, or it could never be served.
    let budget = cfg
        .max_in_flight_bytes
        .clamp((MAX_PAYLOAD + STATUS_COST) as usize, u32::MAX as usize / 2);
    let bytes = Arc::new(Semaphore::new(budget));

    loop {
        let mut hdr = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            r = rd.read_exact(&mut hdr) => r,
            _ = shutdown.wait_for(|v| *v) => {
                debug!(peer, "shutting down: no more requests read");
                break;
            }
            _ = dead.wait_for(|v| *v) => break,
        };
        if let Err(e) = read {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                debug!(peer, "client closed the connection");
            } else {
                debug!(peer, "reading a request: {e}");
            }
            break;
        }
        inner.requests.fetch_add(1, Ordering::Relaxed);
        let req = match parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => {
                warn!(peer, "bad request, disconnecting: {e}");
                break;
            }
        };
        let verdict = check_request(&req, &params);
        if let Verdict::Disconnect(e) = verdict {
            warn!(peer, "disconnecting: {e}");
            break;
        }
        if req.command == Command::Disc {
            debug!(peer, "client sent NBD_CMD_DISC");
            break;
        }

        // Reserve the budget before reading the payload or running the request.
        let permits = tokio::select! {
            p = acquire(&requests, &bytes, cost(&req, verdict)) => p,
            _ = dead.wait_for(|v| *v) => break,
        };
        let Some(permits) = permits else { break };

        let payload = match req.payload_len() {
            0 => Vec::new(),
            len => {
                // Grown as the bytes arrive, so that a client trickling a large
                // payload does not pin all of it up front.
                let mut buf = Vec::with_capacity((len as usize).min(2 << 20));
                let mut payload = (&mut rd).take(len as u64);
                let read = tokio::select! {
                    r = payload.read_to_end(&mut buf) => r,
                    _ = dead.wait_for(|v| *v) => break,
                };
                match read {
                    Ok(n) if n == len as usize => {}
                    Ok(n) => {
                        debug!(peer, "write payload cut off after {n} of {len} bytes");
                        break;
                    }
                    Err(e) => {
                        debug!(peer, "reading a write payload: {e}");
                        break;
                    }
                }
                buf
            }
        };

        match verdict {
            Verdict::Execute => {
                // A hot read is answered here, if the disk can do it at once.
                let now = if req.command == Command::Read && req.length <= INLINE_READ_MAX {
                    catch_unwind(AssertUnwindSafe(|| {
                        read_reply(&*disk, &req, structured, true)
                    }))
                    .unwrap_or_else(|_| Some(error_reply(&req, structured, EIO, "internal error")))
                } else {
                    None
                };
                if let Some(parts) = now {
                    let _ = tx.send(Outgoing {
                        parts,
                        _permits: permits,
                    });
                    continue;
                }
                let disk = disk.clone();
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let parts = catch_unwind(AssertUnwindSafe(|| {
                        execute(&*disk, &req, payload, structured)
                    }))
                    .unwrap_or_else(|_| error_reply(&req, structured, EIO, "internal error"));
                    let _ = tx.send(Outgoing {
                        parts,
                        _permits: permits,
                    });
                });
            }
            Verdict::Reject(errno) => {
                drop(payload);
                let parts = error_reply(&req, structured, errno, reject_message(errno));
                let _ = tx.send(Outgoing {
                    parts,
                    _permits: permits,
                });
            }
            // Handled before the payload was read.
            Verdict::Disconnect(_) => break,
        }
    }

    // Requests in flight finish and their replies go out; then the writer closes.
    drop(tx);
    let _ = writer.await;
}

async fn acquire(
    requests: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
    cost: u32,
) -> Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)> {
    let r = requests.clone().acquire_owned().await.ok()?;
    let b = if cost > 0 {
        Some(bytes.clone().acquire_many_owned(cost).await.ok()?)
    } else {
        None
    };
    Some((r, b))
}

/// Write replies as they come; flush when no more are queued. On a write error the
/// writer stops and says so, and the reader stops too.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    dead: watch::Sender<bool>,
) {
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(out) = rx.recv().await {
        let mut result = Ok(());
        for part in &out.parts {
            result = w.write_all(part).await;
            if result.is_err() {
                break;
            }
        }
        drop(out);
        if result.is_ok() && rx.is_empty() {
            result = w.flush().await;
        }
        if let Err(e) = result {
            debug!("writing a reply: {e}");
            dead.send_replace(true);
            // Dropping the receiver makes every later reply (and its permits) drop.
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

fn reject_message(errno: u32) -> &'static str {
    match errno {
        EINVAL => "invalid request (bad command, flags, range or length)",
        EPERM => "export is read-only",
        ENOSPC => "write past the end of the export",
        ENOTSUP => "zeroing is not fast on this export",
        _ => "request refused",
    }
}

/// An error reply: a structured error chunk when structured replies are on (always
/// for reads), else a simple reply.
fn error_reply(req: &Request, structured: bool, errno: u32, message: &str) -> Vec<Vec<u8>> {
    if structured {
        vec![error_chunk(req.cookie, errno, message)]
    } else {
        vec![simple_reply(req.cookie, errno).to_vec()]
    }
}

fn status_reply(req: &Request, structured: bool, result: io::Result<()>) -> Vec<Vec<u8>> {
    match result {
        Ok(()) => vec![simple_reply(req.cookie, 0).to_vec()],
        Err(e) => {
            debug!("request {:?} failed: {e}", req.command);
            error_reply(req, structured, errno_of(&e), &e.to_string())
        }
    }
}

/// Carry out a request that passed [`check_request`], on a blocking thread.
fn execute(disk: &dyn Disk, req: &Request, payload: Vec<u8>, structured: bool) -> Vec<Vec<u8>> {
    let (off, len, fua) = (req.offset, req.length as u64, req.fua());
    match req.command {
        Command::Read => {
            read_reply(disk, req, structured, false).expect("a blocking read always answers")
        }
        Command::Write => {
            let r = if payload.is_empty() {
                Ok(())
            } else {
                disk.write_at(&payload, off, fua)
            };
            status_reply(req, structured, r)
        }
        Command::Flush => status_reply(req, structured, disk.flush()),
        Command::Trim => {
            let r = if len == 0 {
                Ok(())
            } else {
                disk.trim(off, len, fua)
            };
            status_reply(req, structured, r)
        }
        Command::WriteZeroes => {
            let may_trim = !req.has(CMD_FLAG_NO_HOLE);
            let r = if len == 0 {
                Ok(())
            } else {
                disk.write_zeroes(off, len, may_trim, fua)
            };
            status_reply(req, structured, r)
        }
        Command::Cache => {
            let r = if len == 0 {
                Ok(())
            } else {
                disk.cache(off, len)
            };
            status_reply(req, structured, r)
        }
        Command::BlockStatus => match disk.extents(off, len) {
            Ok(extents) => {
                let d = status_descriptors(&extents, req.length, req.has(CMD_FLAG_REQ_ONE));
                vec![block_status_chunk(req.cookie, META_BASE_ALLOCATION_ID, &d)]
            }
            Err(e) => error_reply(req, structured, errno_of(&e), &e.to_string()),
        },
        Command::Disc | Command::Unknown(_) => error_reply(req, structured, EINVAL, "invalid"),
    }
}

/// The reply to a read. With `now`, only if the disk can answer at once
/// ([`Disk::try_read_at`], [`Disk::try_extents`]): `None` otherwise, nothing sent.
/// Without, always `Some`.
fn read_reply(disk: &dyn Disk, req: &Request, structured: bool, now: bool) -> Option<Vec<Vec<u8>>> {
    let read = |buf: &mut [u8], off: u64| {
        if now {
            disk.try_read_at(buf, off)
        } else {
            Some(disk.read_at(buf, off))
        }
    };
    if structured {
        let extents = |off: u64, len: u64| {
            if now {
                disk.try_extents(off, len)
            } else {
                Some(disk.extents(off, len))
            }
        };
        return structured_read(req, read, extents);
    }
    let mut buf = vec![0u8; req.length as usize];
    Some(match read(&mut buf, req.offset)? {
        Ok(()) => vec![simple_reply(req.cookie, 0).to_vec(), buf],
        Err(e) => vec![simple_reply(req.cookie, errno_of(&e)).to_vec()],
    })
}

/// The disk's extents over `[offset, offset + len)` as `extents` reports them, asking
/// again where an answer stops early. Whatever cannot be learnt (an error, no
/// progress) is left uncovered, and the read planner sends it as data. `None` if
/// `extents` cannot answer at once.
fn collect_extents(
    extents: impl Fn(u64, u64) -> Option<io::Result<Vec<DiskExtent>>>,
    offset: u64,
    len: u64,
) -> Option<Vec<DiskExtent>> {
    let end = offset + len;
    let mut pos = offset;
    let mut out = Vec::new();
    for _ in 0..64 {
        if pos >= end {
            break;
        }
        let got = match extents(pos, end - pos)? {
            Ok(e) => e,
            Err(_) => break,
        };
        let before = pos;
        for e in got {
            if pos >= end {
                break;
            }
            pos += e.len.min(end - pos);
            out.push(e);
        }
        if pos == before {
            break;
        }
    }
    Some(out)
}

/// A structured read: data chunks for what holds data, hole chunks for what reads as
/// zeros, split by the disk's extents (one data chunk with `NBD_CMD_FLAG_DF`). Every
/// byte is read before the first chunk is queued, so an error replaces the whole
/// reply with one error chunk. `None` if `read` or `extents` cannot answer at once.
fn structured_read(
    req: &Request,
    read: impl Fn(&mut [u8], u64) -> Option<io::Result<()>>,
    extents: impl Fn(u64, u64) -> Option<io::Result<Vec<DiskExtent>>>,
) -> Option<Vec<Vec<u8>>> {
    let df = req.has(CMD_FLAG_DF);
    let extents = if df || req.length == 0 {
        Vec::new()
    } else {
        collect_extents(extents, req.offset, req.length as u64)?
    };
    let plan = plan_read(req.offset, req.length, &extents, df);
    if plan.is_empty() {
        return Some(vec![done_chunk(req.cookie).to_vec()]);
    }
    let last = plan.len() - 1;
    let mut parts = Vec::with_capacity(plan.len() * 2);
    for (i, piece) in plan.into_iter().enumerate() {
        match piece {
            ReadPiece::Data { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                if let Err(e) = read(&mut buf, offset)? {
                    debug!("read at {offset} failed: {e}");
                    return Some(vec![error_chunk(req.cookie, errno_of(&e), &e.to_string())]);
                }
                parts.push(data_chunk_header(req.cookie, i == last, offset, len));
                parts.push(buf);
            }
            ReadPiece::Hole { offset, len } => {
                parts.push(hole_chunk(req.cookie, i == last, offset, len));
            }
        }
    }
    Some(parts)
}
