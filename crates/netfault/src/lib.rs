//! # strata-netfault: a fault-injecting TCP proxy for tests
//!
//! The kernel these tests run on has no `tc netem`, so faults between a point and
//! its hub are made here, in user space: [`Proxy`] listens on a loopback port and
//! forwards every connection to an upstream address, and on command it
//!
//! * adds latency to every chunk it forwards ([`Proxy::set_latency`]),
//! * caps the bandwidth of each direction, shared by all connections
//!   ([`Proxy::set_rate`]),
//! * cuts every live connection at once ([`Proxy::cut`]), like a link going down in
//!   the middle of a transfer, and
//! * refuses new connections while "down" ([`Proxy::set_down`]).
//!
//! It counts the bytes it forwarded each way, so a test can check how much a
//! transfer resent after a cut. Plain threads and blocking sockets: the proxy must
//! not share a runtime (or a failure mode) with the code under test.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Settings and counters shared by the proxy's threads.
#[derive(Default)]
struct Shared {
    down: AtomicBool,
    stopped: AtomicBool,
    latency_us: AtomicU64,
    /// Bytes per second per direction; 0 = unlimited.
    rate: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    accepted: AtomicU64,
    cuts: AtomicU64,
    /// Both sockets of every live connection, to cut them.
    live: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// When each direction's bandwidth budget is next free (token bucket as a
    /// virtual clock).
    next_free: [Mutex<Option<Instant>>; 2],
}

/// A running proxy; stops (and cuts everything) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listen on 127.0.0.1 (an ephemeral port) and forward to `upstream`.
    pub fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        thread::spawn(move || accept_loop(listener, upstream, s));
        Ok(Proxy { addr, shared })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delay every forwarded chunk by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cap each direction at `bytes_per_sec` across all connections (0: no cap).
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// Refuse (accept and close at once) new connections while `down`.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Cut every live connection now (both ends see a reset or EOF mid-stream).
    pub fn cut(&self) {
        let live = std::mem::take(&mut *self.shared.live.lock().unwrap());
        for (a, b) in live {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        self.shared.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes forwarded from clients to the upstream.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.shared.to_upstream.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the upstream to clients.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client.load(Ordering::Relaxed)
    }

    /// Connections accepted and forwarded so far.
    pub fn connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn live_connections(&self) -> usize {
        self.shared.live.lock().unwrap().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stopped`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
            shared.live.lock().unwrap().push((c3, s3));
        }
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let up = shared.clone();
        thread::spawn(move || pump(client, server, &up, 0));
        let down = shared.clone();
        thread::spawn(move || pump(s2, c2, &down, 1));
    }
}

/// Copy `from` to `to` until either end closes, applying latency and the rate cap
/// of direction `dir` (0: to upstream, 1: to client).
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, dir: usize) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let latency = shared.latency_us.load(Ordering::Relaxed);
        if latency > 0 {
            thread::sleep(Duration::from_micros(latency));
        }
        throttle(shared, dir, n as u64);
        // Counted before it is written, so a peer that has read it sees it counted.
        let counter = if dir == 0 {
            &shared.to_upstream
        } else {
            &shared.to_client
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
    // Forget sockets whose connection ended.
    let mut live = shared.live.lock().unwrap();
    live.retain(|(a, b)| a.peer_addr().is_ok() && b.peer_addr().is_ok());
}

/// Sleep until `n` more bytes fit the direction's rate.
fn throttle(shared: &Shared, dir: usize, n: u64) {
    let rate = shared.rate.load(Ordering::Relaxed);
    if rate == 0 {
        return;
    }
    let wake = reserve(
        &mut shared.next_free[dir].lock().unwrap(),
        Instant::now(),
        n,
        rate,
    );
    let now = Instant::now();
    if wake > now {
        thread::sleep(wake - now);
    }
}

/// Book `n` bytes at `rate` bytes/s on the direction's virtual clock `next` (when
/// its link is next free) and return when they have been sent: idle time is not
/// saved up, so a burst after a pause is not let through faster than the rate.
fn reserve(next: &mut Option<Instant>, now: Instant, n: u64, rate: u64) -> Instant {
    let start = next.map_or(now, |t| t.max(now));
    let done = start + Duration::from_secs_f64(n as f64 / rate as f64);
    *next = Some(done);
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes what it reads.
    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for c in l.incoming().flatten() {
                thread::spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let mut w = c;
                    let _ = io::copy(&mut r, &mut w);
                });
            }
        });
        addr
    }

    #[test]
    fn forwards_counts_and_cuts() {
        let proxy = Proxy::start(echo_server()).unwrap();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.write_all(b"hello strata").unwrap();
        let mut back = [0u8; 12];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello strata");
        assert_eq!(proxy.bytes_to_upstream(), 12);
        assert_eq!(proxy.bytes_to_client(), 12);
        assert_eq!(proxy.live_connections(), 1);

        // A cut ends the connection mid-stream: the client sees EOF or an error.
        proxy.cut();
        let mut rest = Vec::new();
        let r = c.read_to_end(&mut rest);
        assert!(r.is_err() || rest.is_empty());
        assert_eq!(proxy.live_connections(), 0);

        // Down: new connections are closed at once; up again: forwarded.
        proxy.set_down(true);
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        let _ = c.write_all(b"x");
        let mut one = [0u8; 1];
        assert!(matches!(c.read(&mut one), Ok(0) | Err(_)));
        proxy.set_down(false);
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.write_all(b"y").unwrap();
        c.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"y");
        assert_eq!(proxy.connections(), 2);
    }

    #[test]
    fn rate_cap_books_bytes_on_a_virtual_clock() {
        let t0 = Instant::now();
        let mut next = None;
        // 256 KiB at 1 MiB/s: done a quarter second after the link was free.
        assert_eq!(
            reserve(&mut next, t0, 256 << 10, 1 << 20),
            t0 + Duration::from_millis(250)
        );
        // A second burst queues behind the first.
        assert_eq!(
            reserve(&mut next, t0, 512 << 10, 1 << 20),
            t0 + Duration::from_millis(750)
        );
        // After an idle second, nothing was saved up: it starts from now.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            reserve(&mut next, later, 1 << 20, 1 << 20),
            later + Duration::from_secs(1)
        );
    }

    #[test]
    fn capped_data_arrives_intact() {
        let proxy = Proxy::start(echo_server()).unwrap();
        proxy.set_rate(8 << 20);
        proxy.set_latency(Duration::from_millis(1));
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        let data: Vec<u8> = (0..(256u32 << 10)).map(|i| (i % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let writer = thread::spawn(move || w.write_all(&sent).unwrap());
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back, data);
        assert_eq!(proxy.bytes_to_client(), data.len() as u64);
    }
}
