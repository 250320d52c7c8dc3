//! Serve in-memory disks for manual testing:
//! `cargo run -p strata-nbd --example memserve -- 127.0.0.1:10809 /tmp/nbd.sock`
//! exports `scratch` (64 MiB, writable) and `ro` (16 MiB, read-only, some data).

use std::sync::Arc;

use strata_block::Disk;
use strata_nbd::mem::MemDisk;
use strata_nbd::{Server, ServerConfig, StaticExports};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let sock = args.next();
    let ro = MemDisk::new(16 << 20, 65536);
    ro.fill(&[0x5a; 1 << 20], 1 << 20);
    let mut exports = StaticExports::new();
    exports
        .add(
            "scratch",
            Arc::new(MemDisk::new(64 << 20, 65536)) as Arc<dyn Disk>,
            "writable scratch disk",
        )
        .add(
            "ro",
            Arc::new(ro.read_only(true)) as Arc<dyn Disk>,
            "read-only disk",
        )
        .set_default("scratch");
    let server = Server::new(Arc::new(exports), ServerConfig::default())?;
    let mut listeners = vec![tokio::net::TcpListener::bind(&addr).await?.into()];
    if let Some(path) = sock {
        let _ = std::fs::remove_file(&path);
        listeners.push(tokio::net::UnixListener::bind(&path)?.into());
    }
    let stopper = server.clone();
    tokio::spawn(async move {
        let _ = strata_nbd::shutdown_signal().await;
        stopper.shutdown();
    });
    server.serve_all(listeners).await?;
    server.wait_idle().await;
    Ok(())
}
