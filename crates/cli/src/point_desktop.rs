//! `strata point desktop start|stop|checkin`: a desktop on this point.
//!
//! A desktop has two disks, both ordinary point sessions served by the agent
//! (`strata point run`):
//!
//! * `desktops/NAME/os` over the version its channel points at, with a disposable
//!   delta: never committed or pushed, kept from one start to the next while the
//!   channel stays, and dropped when the channel has moved by the next start (the
//!   new version streams in like any attach: the VM starts before it is local) or an
//!   operator asked for an OS reset (`strata desktop reset-os`) that this point has
//!   not applied yet. Either happens only at a start: never under a running VM;
//! * `desktops/NAME/user` over the user disk's newest version on the hub, committed
//!   and pushed by the agent's sync rounds like any attached session.
//!
//! `start` checks the desktop out first (the hub refuses if another point holds it).
//! If the hub's user disk moved without this point (an operator restored it, or
//! another point held the desktop meanwhile), whatever this point had that the hub
//! lacks is pushed to a `recovery/POINT-TIME` branch before the session starts over
//! from the hub's version, so nothing is lost. After a start the point reports what
//! it runs to the hub (as every sync round does), so `strata desktop show` tells.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_block::SessionDisk;
use strata_point::Point;
use strata_store::{RefKind, Store, StoreError};

use crate::cli::PointDesktopCommand;
use crate::commands::Ctx;
use crate::output::print_json;
use crate::point_cmd::{agent_call, attach_session, open_point, runtime};
use crate::serve::session_dir;

pub fn os_session(name: &str) -> String {
    format!("desktops/{name}/os")
}

#[derive(Serialize)]
struct DiskReport {
    session: String,
    version: String,
    nbd: String,
    /// The OS disk: the version it ran before the channel moved (its delta dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    switched_from: Option<String>,
    /// The OS disk: its delta was dropped for the operators' OS reset request of
    /// this number (the channel did not move).
    #[serde(skip_serializing_if = "Option::is_none")]
    reset: Option<i64>,
    /// The user disk: a branch on the hub keeping what this point had when the hub
    /// had moved on without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<String>,
    /// Blocks still to stream from the hub, if the base is not local yet.
    streaming_blocks: Option<u64>,
}

#[derive(Serialize)]
struct StartReport {
    desktop: String,
    channel: String,
    epoch: i64,
    os: DiskReport,
    user: DiskReport,
    qemu: Vec<String>,
}

pub fn run(ctx: &Ctx, cmd: PointDesktopCommand) -> Result<ExitCode> {
    match cmd {
        PointDesktopCommand::Start {
            name,
            socket,
            exec,
            memory,
        } => start(ctx, &name, &socket, exec, &memory),
        PointDesktopCommand::Stop { name } => {
            let (_, point) = open_point(ctx)?;
            if !point.state()?.sessions.contains_key(&user_image(&name)) {
                bail!("desktop {name} is not started on this point");
            }
            crate::point_cmd::sync(ctx)
        }
        PointDesktopCommand::Checkin { name } => checkin(ctx, &name),
    }
}

fn user_image(name: &str) -> String {
    format!("desktops/{name}/user")
}

/// Stop serving and remove session `name`, its local image and its record (the
/// blocks stay in the store for other versions until gc).
fn drop_session(store: &std::sync::Arc<Store>, point: &Point, name: &str) -> Result<()> {
    agent_call(point, serde_json::json!({"op": "release", "session": name}))
        .with_context(|| format!("releasing session {name}"))?;
    if store.disk_session(name).is_ok() {
        crate::session::remove(store, name)?;
    } else {
        let dir = session_dir(store, name);
        if dir.exists() {
            SessionDisk::remove(&dir)
                .or_else(|_| std::fs::remove_dir_all(&dir))
                .with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    match store.delete_image(name) {
        Ok(()) | Err(StoreError::NoSuchImage(_)) => {}
        Err(e) => return Err(e.into()),
    }
    point.forget_session(name)?;
    Ok(())
}

/// Push what this point has of the user disk and the hub lacks to a recovery
/// branch; `None` if there is nothing the hub lacks.
fn recover(
    ctx: &Ctx,
    store: &Store,
    point: &Point,
    rt: &tokio::runtime::Runtime,
    image: &str,
    hub_has: &str,
) -> Result<Option<String>> {
    // Commit what the session holds (the push to main may fail: the hub moved on).
    let _ = crate::point_cmd::sync_quiet(ctx);
    let local = match store.get_ref(image, RefKind::Branch, "main") {
        Ok(Some(v)) => v,
        _ => return Ok(None),
    };
    if local.to_hex() == hub_has {
        return Ok(None);
    }
    let branch = rt
        .block_on(point.push_recovery(image, "main"))
        .with_context(|| format!("keeping this point's changes of {image}"))?;
    Ok(Some(branch))
}

fn start(ctx: &Ctx, name: &str, socket: &Path, exec: bool, memory: &str) -> Result<ExitCode> {
    let (store, point) = open_point(ctx)?;
    let rt = runtime()?;
    let detail = rt
        .block_on(point.client().check_out_detail(name))
        .with_context(|| format!("checking out desktop {name}"))?;
    let d = &detail.info;
    let (Some(os_image), Some(os_version)) = (d.os_image.clone(), d.os_version.clone()) else {
        bail!(
            "channel {} of desktop {name} points at no version",
            d.channel
        );
    };
    let Some(user_version) = d.user_version.clone() else {
        bail!("the user disk of desktop {name} has no version on the hub");
    };
    let state = point.state()?;

    let os = os_session(name);
    let (mut switched_from, mut reset) = (None, None);
    let os_attach = match state.sessions.get(&os) {
        Some(s) if s.origin_version == os_version && s.os_reset >= detail.os_reset => None,
        current => {
            match current {
                Some(s) if s.origin_version != os_version => {
                    switched_from = Some(s.origin_version.clone())
                }
                Some(_) => reset = Some(detail.os_reset),
                None => {}
            }
            // Refused while a VM is connected: a reset waits for the next start.
            drop_session(&store, &point, &os)?;
            let spec = format!("{os_image}@{os_version}");
            let a = attach_session(ctx, &spec, &os, true)?;
            // A fresh OS disk satisfies every reset asked for so far.
            point.set_os_reset(&os, detail.os_reset)?;
            Some(a)
        }
    };

    let user = d.user_image.clone();
    let mut recovery = None;
    // What this point last knew the hub's user disk to be.
    let known = |s: &strata_point::SessionState| {
        s.hub_tip
            .clone()
            .unwrap_or_else(|| s.origin_version.clone())
    };
    let user_attach = match state.sessions.get(&user) {
        Some(s) if known(s) == user_version => None,
        current => {
            if current.is_some() {
                // The hub moved without this point: keep what it has first.
                recovery = recover(ctx, &store, &point, &rt, &user, &user_version)?;
            }
            drop_session(&store, &point, &user)?;
            let spec = format!("{user}@{user_version}");
            Some(attach_session(ctx, &spec, &user, false)?)
        }
    };

    let nbd = |export: &str| format!("nbd+unix:///{export}?socket={}", socket.display());
    let streaming = |a: &Option<crate::point_cmd::AttachReport>| {
        a.as_ref()
            .and_then(|a| a.streaming.as_ref())
            .map(|p| p.blocks_total - p.blocks_local)
    };
    let qemu: Vec<String> = [
        "qemu-system-x86_64",
        "-machine",
        "accel=kvm:tcg",
        "-m",
        memory,
        "-drive",
        &format!("file={},format=raw,if=virtio,cache=none", nbd(&os)),
        "-drive",
        &format!("file={},format=raw,if=virtio,cache=none", nbd(&user)),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let report = StartReport {
        desktop: name.to_string(),
        channel: d.channel.clone(),
        epoch: d.epoch,
        os: DiskReport {
            session: os.clone(),
            version: os_version,
            nbd: nbd(&os),
            switched_from,
            reset,
            recovery: None,
            streaming_blocks: streaming(&os_attach),
        },
        user: DiskReport {
            session: user.clone(),
            version: user_version,
            nbd: nbd(&user),
            switched_from: None,
            reset: None,
            recovery,
            streaming_blocks: streaming(&user_attach),
        },
        qemu,
    };
    // Best effort: the next sync round reports anyway.
    if let Err(e) = rt.block_on(point.report_desktop(name)) {
        tracing::warn!(desktop = %name, error = %e, "could not report the desktop to the hub");
    }
    if exec {
        let status = Command::new(&report.qemu[0])
            .args(&report.qemu[1..])
            .status()
            .with_context(|| format!("running {}", report.qemu[0]))?;
        return Ok(if status.success() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if ctx.json {
        print_json(&report);
    } else {
        if let Some(from) = &report.os.switched_from {
            println!(
                "os disk switched from {} to {} ({} moved)",
                &from[..12],
                &report.os.version[..12],
                report.channel
            );
        }
        if let Some(n) = report.os.reset {
            println!(
                "os disk reset to the channel's version {} (operators' request #{n})",
                &report.os.version[..12]
            );
        }
        if let Some(r) = &report.user.recovery {
            println!("the hub's user disk had moved on: this point's changes are kept as {r}");
        }
        println!("desktop {name} is checked out here; start it with:");
        println!("{}", report.qemu.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

fn checkin(ctx: &Ctx, name: &str) -> Result<ExitCode> {
    let (store, point) = open_point(ctx)?;
    let user = user_image(name);
    if point.state()?.sessions.contains_key(&user) {
        let r = crate::point_cmd::sync_quiet(ctx)?;
        if !r {
            bail!("the user disk of {name} could not be pushed to the hub; still checked out here");
        }
        drop_session(&store, &point, &user)?;
    }
    drop_session(&store, &point, &os_session(name))?;
    let d = runtime()?.block_on(point.client().check_in(name))?;
    if ctx.json {
        print_json(&d);
    } else {
        println!("desktop {name} checked in; its user disk is on the hub");
    }
    Ok(ExitCode::SUCCESS)
}
