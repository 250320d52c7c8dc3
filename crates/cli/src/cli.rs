//! Command-line grammar.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Strata: versioned, deduplicated disk images.
///
/// The store is found from --store, then $STRATA_STORE, then
/// $XDG_DATA_HOME/strata/store (usually ~/.local/share/strata/store).
#[derive(Parser, Debug)]
#[command(name = "strata", version, propagate_version = true)]
pub struct Cli {
    /// Path of the store.
    #[arg(long, global = true, env = "STRATA_STORE", value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new, empty store.
    Init {
        /// Where to create it (default: the store path from --store, $STRATA_STORE or
        /// the default location).
        path: Option<PathBuf>,
    },
    /// Import a disk image file as a new version of IMAGE (on its BRANCH, default main).
    Import(ImportArgs),
    /// Write a version of an image to a file.
    Export(ExportArgs),
    /// List images with their branches and tags.
    Images,
    /// Show the history of a branch or version.
    Log {
        /// IMAGE, IMAGE:BRANCH or IMAGE@REV.
        spec: String,
        /// Show at most this many versions.
        #[arg(short = 'n', long, default_value_t = 50)]
        max_count: usize,
    },
    /// Show one version in detail.
    Show {
        /// IMAGE@REV (or IMAGE for the tip of main).
        spec: String,
    },
    /// Create, delete or list tags.
    #[command(subcommand)]
    Tag(RefCommand),
    /// Create, delete or list branches.
    #[command(subcommand)]
    Branch(RefCommand),
    /// Make a new image from a version, sharing every block (costs nothing).
    Clone {
        /// IMAGE@REV to start from.
        from: String,
        /// Name of the new image.
        new: String,
    },
    /// Delete an image and its refs (its data is reclaimed by the next gc).
    Rm { image: String },
    /// Show which byte ranges differ between two versions.
    Diff {
        /// IMAGE@REV
        a: String,
        /// IMAGE@REV
        b: String,
        /// Print totals only, not every range.
        #[arg(long)]
        stat: bool,
    },
    /// Logical and stored bytes of the whole store, with dedup and compression ratios.
    Stats,
    /// Remove everything that no branch or tag reaches.
    Gc,
    /// Re-read and re-hash everything; name damaged objects and the versions they hurt.
    Verify,
    /// Serve versions (read-only, as IMAGE@REV) and sessions (writable) over NBD.
    ///
    /// Without --listen or --socket, listens on the sockets systemd passes
    /// (LISTEN_FDS), else on 127.0.0.1:10809.
    Serve {
        /// TCP address to listen on (repeatable), e.g. 127.0.0.1:10809.
        #[arg(long, value_name = "HOST:PORT")]
        listen: Vec<String>,
        /// Unix socket to listen on (repeatable).
        #[arg(long, value_name = "PATH")]
        socket: Vec<PathBuf>,
        /// Directory with server-cert.pem and server-key.pem: offer TLS (STARTTLS).
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Refuse clients that do not start TLS.
        #[arg(long)]
        tls_required: bool,
        /// The export a client gets when it names none (e.g. `nbdcopy [ strata serve ... ]`).
        #[arg(long, value_name = "NAME")]
        default_export: Option<String>,
        #[command(flatten)]
        cache: BlockCacheArgs,
    },
    /// Copy-on-write disk sessions over a version, served by `strata serve`.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Carry a version in a file (USB stick, DVD) instead of over the network.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Release channels of gold images on a hub (win11/dev, win11/production, ...).
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Desktops on a hub: an OS disk following a channel plus a user disk.
    #[command(subcommand)]
    Desktop(DesktopCommand),
    /// Run a hub (the data centre's image service) and administer it.
    #[command(subcommand)]
    Hub(HubCommand),
    /// This store as a point of a hub: enrol, pull, attach sessions, run the agent.
    #[command(subcommand)]
    Point(PointCommand),
    /// Tour the store with a sample image (two versions, log, diff, stats), then
    /// start a hub and a point serving a desktop over NBD, left running (see
    /// --stop); prints the NBD URIs and the qemu command.
    Quickstart {
        /// Directory for everything (default: $XDG_DATA_HOME/strata/quickstart): new,
        /// empty, or a stopped quickstart's (made afresh).
        dir: Option<PathBuf>,
        /// Stop the hub and the point agent the quickstart in DIR started.
        #[arg(long)]
        stop: bool,
    },
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// Disk image file (raw, qcow2; vmdk, vhdx, vdi, vpc through qemu-img).
    pub file: PathBuf,
    /// IMAGE or IMAGE:BRANCH.
    pub target: String,
    /// Message recorded with the version.
    #[arg(short, long, default_value = "")]
    pub message: String,
    /// Format of FILE (default: detected from its content).
    #[arg(short, long)]
    pub format: Option<String>,
    /// Block size of a new image (power of two, 4K to 4M).
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
    /// Author recorded with the version (default: $USER@hostname).
    #[arg(long)]
    pub author: Option<String>,
    /// How deep a qcow2 backing chain may go.
    #[arg(long, default_value_t = 16)]
    pub max_backing_depth: usize,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// IMAGE or IMAGE@REV.
    pub spec: String,
    /// Output file (must not exist unless --force).
    pub file: PathBuf,
    /// Output format: raw or qcow2.
    #[arg(short, long, default_value = "raw")]
    pub format: String,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// Create a writable session over IMAGE, IMAGE:BRANCH or IMAGE@REV.
    Create {
        name: String,
        #[arg(long)]
        from: String,
    },
    /// List sessions: base, bytes written, whether a server holds them.
    Ls,
    /// Make a new version from the session's base and its writes so far (clients may
    /// stay connected and keep writing).
    Commit {
        name: String,
        #[arg(short, long, default_value = "")]
        message: String,
        /// Branch to move (default: the branch the session was made from).
        #[arg(long)]
        branch: Option<String>,
    },
    /// Drop the session's writes: back to its base.
    Reset { name: String },
    /// Delete the session and its writes.
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum BundleCommand {
    /// Write IMAGE@REV (blocks, tree, version record) to FILE.
    Export {
        /// IMAGE@REV (or IMAGE for the tip of main).
        spec: String,
        file: PathBuf,
        /// Hold only what changed since this version of the image (the receiver must
        /// have it); changed blocks travel as deltas against it.
        #[arg(long, value_name = "REV")]
        since: Option<String>,
        /// zstd level (1-19).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        level: i32,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Verify FILE and add its version to this store, moving a branch to it.
    Import {
        file: PathBuf,
        /// Put it in this image (default: the image it was exported from).
        #[arg(long, value_name = "NAME")]
        image: Option<String>,
        /// The branch to move (created if new; moved if it is an ancestor).
        #[arg(long, value_name = "NAME", default_value = "main")]
        branch: String,
        /// Move the branch even if its tip is not an ancestor of the bundle's version.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChannelCommand {
    /// Point CHANNEL (created if new) at IMAGE@REV of the hub.
    Publish {
        /// IMAGE@REV on the hub.
        spec: String,
        channel: String,
        /// Only if the channel's log is still at this sequence number (0: new).
        #[arg(long, value_name = "SEQ")]
        expect_seq: Option<i64>,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Point channel TO at the version channel FROM points at.
    Promote {
        from: String,
        to: String,
        #[arg(long, value_name = "SEQ")]
        expect_seq: Option<i64>,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Return CHANNEL to the version it had before its current one.
    Rollback {
        channel: String,
        #[arg(long, value_name = "SEQ")]
        expect_seq: Option<i64>,
        #[command(flatten)]
        access: HubAccess,
    },
    /// The history of CHANNEL, newest first.
    Log {
        channel: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Every channel and where it points.
    Ls {
        #[command(flatten)]
        access: HubAccess,
    },
}

#[derive(Subcommand, Debug)]
pub enum DesktopCommand {
    /// Make desktop NAME following CHANNEL, with an empty user disk of --size or a
    /// copy of --template.
    Create {
        name: String,
        #[arg(long)]
        channel: String,
        /// Size of an empty user disk (e.g. 20G).
        #[arg(long, value_parser = parse_size, conflicts_with = "template")]
        size: Option<u64>,
        /// IMAGE@REV on the hub to start the user disk from.
        #[arg(long, value_name = "IMAGE@REV")]
        template: Option<String>,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Every desktop: channel, versions, holder.
    Ls {
        #[command(flatten)]
        access: HubAccess,
    },
    /// One desktop in detail.
    Show {
        name: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Delete a desktop and its user disk (reclaimed by the hub's next gc).
    Rm {
        name: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Roll NAME's user disk back to a restore point (the current state stays one:
    /// restoring to it undoes this).
    Restore {
        name: String,
        /// A time (RFC 3339 or Unix seconds: the newest restore point at or before
        /// it) or a version of the user disk.
        #[arg(long, value_name = "TIME|VERSION")]
        to: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// The kept versions of NAME's user disk, newest first.
    RestorePoints {
        name: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Return NAME's OS disk to its channel's version: the holding point drops the
    /// OS disk's changes at the desktop's next start (never under a running VM).
    ResetOs {
        name: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Hand desktop NAME to POINT; --force takes it from the point holding it.
    Transfer {
        name: String,
        point: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        access: HubAccess,
    },
}

/// How a server caches the decoded blocks of the versions it serves (see
/// `strata_block`'s block cache: one unnamed file per open version under
/// `STORE/cache/`, gone when the server stops).
#[derive(Args, Debug, Clone)]
pub struct BlockCacheArgs {
    /// Keep at least SIZE free on the store's file system: the block cache stops
    /// growing below it (default: 5% of the file system, at least 1 GiB and at most
    /// 8 GiB; 0: grow until the file system is full).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub cache_reserve: Option<u64>,
    /// Do not cache decoded blocks in a local file (every read decodes from the store).
    #[arg(long, conflicts_with = "cache_reserve")]
    pub no_block_cache: bool,
}

impl BlockCacheArgs {
    pub fn config(&self) -> strata_block::BlockCacheConfig {
        strata_block::BlockCacheConfig {
            enabled: !self.no_block_cache,
            min_free_bytes: self.cache_reserve,
        }
    }
}

/// How an operator command reaches a running hub.
#[derive(Args, Debug, Clone)]
pub struct HubAccess {
    /// The hub's directory: its admin.token, and its URL (hub.url, written by
    /// `strata hub run`) unless --hub is given.
    #[arg(long, value_name = "DIR", env = "STRATA_HUB_DIR")]
    pub dir: Option<PathBuf>,
    /// The hub's URL, e.g. https://hub.example:7443.
    #[arg(long = "hub", value_name = "URL", env = "STRATA_HUB")]
    pub url: Option<String>,
    /// File holding the admin credential (default: DIR/admin.token).
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM certificate(s) to trust for an https hub.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum HubCommand {
    /// Create a hub directory: DIR/store, DIR/hub.sqlite and DIR/admin.token (0600).
    Init { dir: PathBuf },
    /// Serve the hub in DIR until killed; prints its URL (with --json one JSON line).
    Run {
        dir: PathBuf,
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:7443", value_name = "HOST:PORT")]
        listen: String,
        /// TLS certificate chain (PEM); with --tls-key serves HTTPS.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Allow plain HTTP on an address that is not loopback.
        #[arg(long)]
        insecure: bool,
        /// Restore points of desktops' user disks to keep, e.g.
        /// `last=1,hourly=24,daily=30,monthly=12` (the default).
        #[arg(long, value_name = "POLICY")]
        retention: Option<String>,
        /// Run gc this often, the first time an hour after the start (pruned
        /// restore points and other unreachable data go only then); 0 turns it
        /// off, leaving it to `strata hub gc`.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "24h")]
        gc_interval: std::time::Duration,
    },
    /// Remove what nothing on the hub in DIR reaches now (pruned restore points,
    /// versions of removed images), and page indexes of removed versions. Safe while
    /// the hub runs and points push and pull.
    Gc { dir: PathBuf },
    /// Make a one-time enrolment token for a point called NAME.
    Enroll {
        name: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Let POINT read IMAGE.
    Grant {
        point: String,
        image: String,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Withdraw POINT's grant of IMAGE; without IMAGE, revoke POINT's credential.
    Revoke {
        point: String,
        image: Option<String>,
        #[command(flatten)]
        access: HubAccess,
    },
    /// List enrolled points.
    Points {
        #[command(flatten)]
        access: HubAccess,
    },
    /// Show the audit log, newest first.
    Audit {
        #[arg(short = 'n', long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        access: HubAccess,
    },
    /// Desktops served from the hub itself.
    #[command(subcommand)]
    Desktop(HubDesktopCommand),
    /// Upload IMAGE[:BRANCH] from a local store to the hub (only what it lacks).
    Push {
        /// IMAGE or IMAGE:BRANCH.
        target: String,
        /// The store to read it from (default: --store / $STRATA_STORE).
        #[arg(long, value_name = "PATH")]
        from_store: Option<PathBuf>,
        #[command(flatten)]
        access: HubAccess,
    },
}

#[derive(Subcommand, Debug)]
pub enum HubDesktopCommand {
    /// Serve desktop NAME's latest synced OS and user disks over NBD from the hub's
    /// store (e.g. to run a lost laptop's desktop on a data-centre VM). Read-only
    /// unless --writable: then the hub checks the desktop out to itself and serves
    /// two sessions, exports `desktops/NAME/os` (over the channel's version, changes
    /// thrown away) and `desktops/NAME/user` (over the user disk's newest version);
    /// on SIGINT/SIGTERM the user disk is committed to its `main` (a restore point)
    /// and the desktop released, ready for `strata desktop transfer NAME POINT`.
    /// Needs the hub's directory (--dir).
    Serve {
        name: String,
        /// Serve sessions that are checked back in when the server stops.
        #[arg(long)]
        writable: bool,
        /// With --writable: take the desktop from the point holding it (that point
        /// keeps its unsynced changes as a recovery branch at its next contact).
        #[arg(long, requires = "writable")]
        force: bool,
        /// TCP address to listen on (repeatable).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Vec<String>,
        /// Unix socket to listen on (repeatable).
        #[arg(long, value_name = "PATH")]
        socket: Vec<PathBuf>,
        #[command(flatten)]
        cache: BlockCacheArgs,
        #[command(flatten)]
        access: HubAccess,
    },
}

#[derive(Subcommand, Debug)]
pub enum PointCommand {
    /// Make this store (created if needed) a point of the hub at HUB_URL.
    Enroll {
        hub_url: String,
        /// The one-time token from `strata hub enroll`.
        token: String,
        /// PEM certificate(s) to trust for an https hub.
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
        /// Bandwidth cap to the hub, bytes per second (e.g. 10M).
        #[arg(long, value_parser = parse_size, value_name = "RATE")]
        max_rate: Option<u64>,
        /// How often the agent commits and pushes (e.g. 5m, 30s).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        sync_interval: Option<std::time::Duration>,
    },
    /// Fetch IMAGE[@REV] from the hub in full, only the blocks not already here.
    Pull {
        spec: String,
        /// Give up after this many runs in a row that received nothing (a run cut
        /// after it received data is resumed however often it happens).
        #[arg(long, default_value_t = 5)]
        attempts: u32,
        /// A local raw or qcow2 image to take matching blocks from (a block is taken
        /// only if its hash is what the version lists at that place).
        #[arg(long, value_name = "FILE")]
        seed: Option<PathBuf>,
    },
    /// Start a session NAME over IMAGE@REV of the hub; its commits are this point's
    /// image NAME, pushed to the hub.
    Attach {
        spec: String,
        #[arg(long, value_name = "NAME")]
        session: String,
    },
    /// The agent: serve sessions and versions over NBD, commit and push periodically.
    Run {
        /// TCP address to listen on (repeatable).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Vec<String>,
        /// Unix socket to listen on (repeatable).
        #[arg(long, value_name = "PATH")]
        socket: Vec<PathBuf>,
        /// Directory with server-cert.pem and server-key.pem: offer TLS (STARTTLS).
        #[arg(long, value_name = "DIR")]
        tls_dir: Option<PathBuf>,
        /// Override the enrolled sync interval (e.g. 5m, 1s).
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        sync_interval: Option<std::time::Duration>,
        /// How long a read of a block not yet fetched waits for an absent hub before
        /// it fails with an I/O error.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "30s")]
        fetch_timeout: std::time::Duration,
        /// Do not prefetch streamed bases in the background (blocks are fetched only
        /// as they are read).
        #[arg(long)]
        no_prefetch: bool,
        #[command(flatten)]
        cache: BlockCacheArgs,
    },
    /// Commit and push now (through the running agent, or here if none runs).
    Sync,
    /// Hub, last sync, and per session: base, local tip, hub tip, pending versions.
    Status,
    /// Desktops on this point: check out, prepare both disks, start, stop.
    #[command(subcommand)]
    Desktop(PointDesktopCommand),
}

#[derive(Subcommand, Debug)]
pub enum PointDesktopCommand {
    /// Check desktop NAME out to this point, make its OS disk (the channel's version,
    /// switched when the channel moved) and user disk ready, and print the qemu
    /// command that attaches them through the agent's NBD socket.
    Start {
        name: String,
        /// The Unix socket `strata point run --socket` serves on.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// Run the qemu command instead of printing it.
        #[arg(long)]
        exec: bool,
        /// Memory for the VM (qemu -m).
        #[arg(long, default_value = "2048")]
        memory: String,
    },
    /// Commit the user disk and push it to the hub (the desktop stays checked out).
    Stop { name: String },
    /// Stop, then release the desktop so another point may check it out.
    Checkin { name: String },
}

#[derive(Subcommand, Debug)]
pub enum RefCommand {
    /// List them.
    Ls { image: String },
    /// Create NAME at IMAGE@REV.
    Add { spec: String, name: String },
    /// Delete NAME of IMAGE.
    Rm { image: String, name: String },
}

/// Parse "5m", "30s", "1h 30m".
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration (e.g. 30s, 5m): {e}"))
}

/// Parse "65536", "64K", "64k", "4M", "4MiB".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 65536, 64K, 4M)"))
}
