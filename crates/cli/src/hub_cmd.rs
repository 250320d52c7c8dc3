//! `strata hub ...`: run a hub (`init`, `run`) and administer a running one with the
//! admin credential (`enroll`, `grant`, `revoke`, `points`, `audit`, `push`).
//!
//! Operators put gold images on the hub with `strata hub push IMAGE[:BRANCH]`, which
//! uploads from any local store through the API (only the blocks the hub lacks, and
//! recorded in the audit log), while the hub keeps running. (Importing straight into
//! `DIR/store` with `strata import --store DIR/store` also works, but only while the
//! hub is stopped, and leaves no audit entry.)
//!
//! The operator commands find the hub from `--hub URL` and `--admin-token-file F`,
//! or from `--dir DIR`: `DIR/admin.token`, and `DIR/hub.url`, which `hub run` writes
//! when it starts.
//!
//! `hub desktop serve NAME` serves a desktop from the hub's own store (beside the
//! running hub: the store is safe to share between processes): read-only, the
//! synced disks as they are; with `--writable`, as two sessions in the hub's store
//! while the hub holds the desktop (checked out to `hub`, audited; `--force` takes
//! it from a point, which keeps its tail as a recovery branch at its next contact).
//! When the server stops (SIGINT/SIGTERM) the user session is committed and its
//! version put on the user disk's `main` through the API by compare-and-swap (so
//! the hub tags it as a restore point and audits it); if `main` moved meanwhile it
//! stays on a `recovery/hub-TIME` branch instead. Both sessions are then removed and
//! the desktop released, so `strata desktop transfer NAME POINT` hands it on without
//! `--force`. A serve that was killed leaves the hub holding the desktop and its
//! user session in the store: the next `--writable` serve settles that session
//! first (its writes are kept), then serves afresh.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use strata_block::SessionDisk;
use strata_store::{RefKind, Store, VersionId};
use strata_sync::api::HUB_HOLDER;
use strata_sync::{ClientConfig, HubClient, PushOptions, SyncError};

use crate::cli::{BlockCacheArgs, HubAccess, HubCommand, HubDesktopCommand};
use crate::commands::Ctx;
use crate::output::{bytes, print_json, time};
use crate::spec::branch_target;

/// The file in a hub directory where `hub run` records its URL.
pub const URL_FILE: &str = "hub.url";

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// An admin client for the hub `access` names.
pub(crate) fn admin_client(access: &HubAccess) -> Result<HubClient> {
    let url = match (&access.url, &access.dir) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => {
            let f = d.join(URL_FILE);
            std::fs::read_to_string(&f)
                .with_context(|| {
                    format!(
                        "reading {} (is `strata hub run {}` running? or give --hub URL)",
                        f.display(),
                        d.display()
                    )
                })?
                .trim()
                .to_string()
        }
        (None, None) => bail!("which hub? give --hub URL (and --admin-token-file) or --dir DIR"),
    };
    let token_file = match (&access.admin_token_file, &access.dir) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) => d.join("admin.token"),
        (None, None) => bail!("give --admin-token-file FILE (or --dir DIR)"),
    };
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("reading the admin credential {}", token_file.display()))?;
    let mut cfg = ClientConfig::new(&url).credential(token.trim());
    if let Some(ca) = &access.ca {
        cfg.ca_pem = Some(std::fs::read(ca).with_context(|| ca.display().to_string())?);
    }
    Ok(HubClient::new(&cfg)?)
}

fn parse_listen(s: &str) -> Result<SocketAddr> {
    s.to_socket_addrs()
        .with_context(|| format!("listen address {s:?}"))?
        .next()
        .ok_or_else(|| anyhow!("listen address {s:?} resolves to nothing"))
}

pub fn run(ctx: &Ctx, cmd: HubCommand) -> Result<ExitCode> {
    match cmd {
        HubCommand::Init { dir } => {
            let r = strata_hub::init(&dir)?;
            if ctx.json {
                print_json(&serde_json::json!({
                    "dir": dir,
                    "store": r.store,
                    "admin_token_file": r.admin_token_path,
                }));
            } else {
                println!(
                    "hub initialised in {}\nadmin credential in {} (keep it secret)\nstart it with: strata hub run {}",
                    dir.display(),
                    r.admin_token_path.display(),
                    dir.display()
                );
            }
        }
        HubCommand::Run {
            dir,
            listen,
            tls_cert,
            tls_key,
            insecure,
            retention,
            gc_interval,
        } => hub_run(
            ctx,
            &dir,
            &listen,
            tls_cert.zip(tls_key),
            insecure,
            retention.as_deref(),
            gc_interval,
        )?,
        HubCommand::Gc { dir } => hub_gc(ctx, &dir)?,
        HubCommand::Desktop(HubDesktopCommand::Serve {
            name,
            writable: false,
            listen,
            socket,
            cache,
            access,
            ..
        }) => desktop_serve(ctx, &name, serve_args(listen, socket, &cache), &access)?,
        HubCommand::Desktop(HubDesktopCommand::Serve {
            name,
            writable: true,
            force,
            listen,
            socket,
            cache,
            access,
        }) => desktop_serve_writable(
            ctx,
            &name,
            force,
            serve_args(listen, socket, &cache),
            &access,
        )?,
        HubCommand::Enroll { name, access } => {
            let client = admin_client(&access)?;
            let t = runtime()?.block_on(client.create_enrollment(&name))?;
            if ctx.json {
                print_json(&t);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "one-time token for point {name:?}; on the point run: strata point enroll HUB_URL TOKEN"
                );
            }
        }
        HubCommand::Grant {
            point,
            image,
            access,
        } => {
            let client = admin_client(&access)?;
            runtime()?.block_on(client.grant(&point, &image))?;
            if ctx.json {
                print_json(&serde_json::json!({"granted": {"point": point, "image": image}}));
            } else {
                println!("{point} may now read {image}");
            }
        }
        HubCommand::Revoke {
            point,
            image,
            access,
        } => {
            let client = admin_client(&access)?;
            let rt = runtime()?;
            match &image {
                Some(image) => rt.block_on(client.revoke_grant(&point, image))?,
                None => rt.block_on(client.revoke_point(&point))?,
            }
            if ctx.json {
                print_json(&serde_json::json!({"revoked": {"point": point, "image": image}}));
            } else {
                match image {
                    Some(i) => println!("{point} may no longer read {i}"),
                    None => println!("{point}'s credential is revoked"),
                }
            }
        }
        HubCommand::Points { access } => {
            let client = admin_client(&access)?;
            let points = runtime()?.block_on(client.points())?;
            if ctx.json {
                print_json(&points);
            } else {
                for p in points {
                    println!(
                        "{:<20} enrolled {}{}  reads [{}]  owns [{}]",
                        p.name,
                        time(p.enrolled),
                        if p.revoked { "  REVOKED" } else { "" },
                        p.grants.join(", "),
                        p.owns.join(", ")
                    );
                }
            }
        }
        HubCommand::Audit { limit, access } => {
            let client = admin_client(&access)?;
            let entries = runtime()?.block_on(client.audit(limit))?;
            if ctx.json {
                print_json(&entries);
            } else {
                for e in entries {
                    println!(
                        "{} {:<16} {:<16} {} {}",
                        time(e.time),
                        e.actor,
                        e.action,
                        e.target,
                        e.detail
                    );
                }
            }
        }
        HubCommand::Push {
            target,
            from_store,
            access,
        } => {
            let client = admin_client(&access)?;
            let path = from_store.unwrap_or_else(|| ctx.store_path.clone());
            let store = Arc::new(Store::open(&path)?);
            let (image, branch) = branch_target(&target)?;
            let v = store.resolve(&image, Some(&branch))?;
            let st = runtime()?.block_on(strata_sync::push(
                &store,
                &client,
                &image,
                &branch,
                &v,
                &PushOptions::default(),
            ))?;
            if ctx.json {
                print_json(&st);
            } else {
                println!(
                    "{image}:{branch} -> {} on the hub: {} objects ({} data), {} sent",
                    &st.version[..12.min(st.version.len())],
                    st.objects(),
                    st.data_objects,
                    bytes(st.wire_sent)
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn hub_run(
    ctx: &Ctx,
    dir: &Path,
    listen: &str,
    tls: Option<(PathBuf, PathBuf)>,
    insecure: bool,
    retention: Option<&str>,
    gc_interval: std::time::Duration,
) -> Result<()> {
    let mut cfg = strata_hub::HubConfig::new(dir, parse_listen(listen)?);
    cfg.tls = tls;
    cfg.insecure = insecure;
    cfg.gc_interval = (!gc_interval.is_zero()).then_some(gc_interval);
    if let Some(r) = retention {
        cfg.retention = r.parse().map_err(|e| anyhow!("--retention {r:?}: {e}"))?;
    }
    let rt = runtime()?;
    rt.block_on(async {
        let running = strata_hub::start(cfg).await?;
        let url = running.url();
        let url_file = dir.join(URL_FILE);
        std::fs::write(&url_file, format!("{url}\n"))
            .with_context(|| url_file.display().to_string())?;
        if ctx.json {
            // One line, so a supervisor (or a test) can read it as it starts.
            println!(
                "{}",
                serde_json::json!({"url": url, "listen": running.addr(), "dir": dir})
            );
        } else {
            println!("hub {} listening on {url}", dir.display());
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::select! {
            r = running.wait() => r,
            _ = strata_nbd::shutdown_signal() => Ok(()),
        }
    })
}

/// `hub gc DIR`: the store's gc, then page indexes of the versions it removed.
fn hub_gc(ctx: &Ctx, dir: &Path) -> Result<()> {
    let store = Store::open(&dir.join("store"))
        .with_context(|| format!("{}: not a hub directory", dir.display()))?;
    let sp = crate::output::spinner("hub gc", ctx.hide_progress());
    let r = strata_hub::gc::gc(dir, &store, &mut |phase| {
        sp.set_message(format!("hub gc: {}", phase.describe()))
    });
    sp.finish_and_clear();
    let r = match r {
        Err(strata_store::StoreError::GcBusy) => {
            bail!(
                "a gc is already running on {} (the hub's own, or another `strata hub gc`)",
                dir.display()
            )
        }
        r => r?,
    };
    if ctx.json {
        print_json(&r);
    } else {
        crate::commands::print_gc(&r.store);
        println!(
            "hub gc: {} page indexes of removed versions dropped",
            r.page_indexes_removed
        );
    }
    Ok(())
}

/// The hub directory `hub desktop serve` serves the store of (`--dir` is required).
fn served_dir(access: &HubAccess) -> Result<&PathBuf> {
    match &access.dir {
        Some(dir) => Ok(dir),
        None => bail!("give the hub's directory with --dir (its store is served)"),
    }
}

/// `hub desktop serve`: the desktop's disks as they are on the hub, read-only.
fn desktop_serve(
    ctx: &Ctx,
    name: &str,
    serve: crate::serve::ServeArgs,
    access: &HubAccess,
) -> Result<()> {
    let dir = served_dir(access)?;
    let d = runtime()?.block_on(admin_client(access)?.desktop(name))?;
    let (Some(os_image), Some(os_version)) = (&d.os_image, &d.os_version) else {
        bail!(
            "channel {} of desktop {name} points at no version",
            d.channel
        );
    };
    let Some(user_version) = &d.user_version else {
        bail!("desktop {name} has no user disk version");
    };
    let os = format!("{os_image}@{os_version}");
    let user = format!("{}@{user_version}", d.user_image);
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"desktop": name, "os": os, "user": user, "holder": d.holder})
        );
    } else {
        println!("desktop {name}: OS disk export {os}");
        println!("desktop {name}: user disk export {user} (synced state; read-only)");
        if let Some(h) = &d.holder {
            println!("(checked out to {h}: hand it over with `strata desktop transfer`)");
        }
    }
    let store = Arc::new(Store::open(&dir.join("store"))?);
    crate::serve::serve(store, serve, ctx.json)
}

fn serve_args(
    listen: Vec<String>,
    sockets: Vec<PathBuf>,
    cache: &BlockCacheArgs,
) -> crate::serve::ServeArgs {
    crate::serve::ServeArgs {
        default_export: None,
        cache: cache.config(),
        listen: if listen.is_empty() && sockets.is_empty() {
            vec!["127.0.0.1:10809".into()]
        } else {
            listen
        },
        sockets,
        tls_dir: None,
        tls_required: false,
    }
}

/// What became of a user disk session the hub served.
#[derive(Default, serde::Serialize)]
struct Settled {
    /// The version now on the user disk's `main` (hex), if the session had changes
    /// and `main` was still where it started.
    main: Option<String>,
    /// Else the branch keeping them.
    recovery: Option<String>,
    committed_blocks: u64,
}

/// Make what session `session` over the user disk `image` holds a version, and put
/// it on the hub's `main` through the API by compare-and-swap (the hub makes it a
/// restore point) if `main` is where the session started and `to_main`; else keep
/// it on a `recovery/hub-TIME` branch. The session is left empty on that version.
fn settle_user_session(
    rt: &tokio::runtime::Runtime,
    client: &HubClient,
    store: &Arc<Store>,
    session: &str,
    image: &str,
    to_main: bool,
) -> Result<Settled> {
    let mut out = Settled::default();
    let info = store.disk_session(session)?;
    let delta = SessionDisk::inspect(&crate::serve::session_dir(store, session))?.delta_blocks;
    let side = format!("{RECOVERY_PREFIX}hub-{}", strata_store::catalog::now());
    let v = if delta > 0 {
        let c = crate::session::commit_cmd(
            store,
            session,
            "served by the hub (strata hub desktop serve --writable)",
            Some(side.clone()),
            &format!("{} (hub)", crate::commands::default_author()),
        )?;
        out.committed_blocks = c["committed_blocks"].as_u64().unwrap_or(0);
        c["version"]
            .as_str()
            .and_then(VersionId::from_hex)
            .ok_or_else(|| anyhow!("the commit of {session} named no version: {c}"))?
    } else {
        VersionId::from_hex(&info.base)
            .ok_or_else(|| anyhow!("session {session} has a bad base {:?}", info.base))?
    };
    let main = store.get_ref(image, RefKind::Branch, "main")?;
    if main == Some(v) {
        return Ok(out);
    }
    // A version this (or a killed) serve committed on top of `main`: publish it.
    let parent = store
        .load_version(&v)?
        .parents
        .first()
        .and_then(|p| VersionId::from_hex(p));
    if to_main && parent.is_some() && parent == main {
        match rt.block_on(client.cas_ref(image, "main", main.as_ref(), &v)) {
            Ok(_) => {
                // The side branches that kept it until now (this one, or a killed
                // serve's) have served.
                for r in store.refs(image, RefKind::Branch)? {
                    if r.name.starts_with(&format!("{RECOVERY_PREFIX}hub-"))
                        && r.version == v.to_hex()
                    {
                        store.delete_ref(image, RefKind::Branch, &r.name)?;
                    }
                }
                out.main = Some(v.to_hex());
                return Ok(out);
            }
            // `main` moved meanwhile: keep the changes beside it.
            Err(SyncError::Conflict(_)) => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "moving {image}:main to {} (the served changes are kept on {side})",
                    v.short()
                )))
            }
        }
    }
    if delta > 0 {
        out.recovery = Some(side);
    }
    Ok(out)
}

/// The branch prefix a desktop's changes are kept under when they cannot go to
/// `main` (`strata_hub::desktops::RECOVERY_PREFIX`).
const RECOVERY_PREFIX: &str = "recovery/";

/// Remove session `name` from `store` if there is one.
fn remove_session(store: &Arc<Store>, name: &str) -> Result<()> {
    if store.disk_session(name).is_ok() {
        crate::session::remove(store, name)?;
    }
    Ok(())
}

/// `hub desktop serve --writable`: see the module documentation.
fn desktop_serve_writable(
    ctx: &Ctx,
    name: &str,
    force: bool,
    serve: crate::serve::ServeArgs,
    access: &HubAccess,
) -> Result<()> {
    let dir = served_dir(access)?;
    let store = Arc::new(Store::open(&dir.join("store"))?);
    if crate::serve::send_control(&store, &crate::serve::Control::Clients)?.is_some() {
        bail!(
            "a server already runs on the hub's store ({} answers)",
            crate::serve::control_path(&store).display()
        );
    }
    let client = admin_client(access)?;
    let rt = runtime()?;
    let before = rt.block_on(client.desktop_detail(name))?;
    let d = rt
        .block_on(client.transfer_desktop(name, HUB_HOLDER, force))
        .with_context(|| format!("checking desktop {name} out to the hub"))?;
    let taken_from = before
        .info
        .holder
        .filter(|h| h != HUB_HOLDER && d.holder.as_deref() == Some(HUB_HOLDER));
    let (Some(os_image), Some(os_version)) = (&d.os_image, &d.os_version) else {
        bail!(
            "channel {} of desktop {name} points at no version",
            d.channel
        );
    };
    let (os, user) = (
        crate::point_desktop::os_session(name),
        format!("desktops/{name}/user"),
    );
    // A serve that was killed left its user session: its writes are kept first.
    let mut leftover = None;
    if store.disk_session(&user).is_ok() {
        leftover = Some(settle_user_session(
            &rt,
            &client,
            &store,
            &user,
            &d.user_image,
            true,
        )?);
        remove_session(&store, &user)?;
    }
    let user_version = store
        .get_ref(&d.user_image, RefKind::Branch, "main")?
        .ok_or_else(|| anyhow!("desktop {name} has no user disk version"))?;
    // The OS disk starts from the channel's version every time (its changes are
    // disposable, and so every OS reset request is honoured).
    remove_session(&store, &os)?;
    crate::session::create(&store, &os, &format!("{os_image}@{os_version}"))?;
    crate::session::create(
        &store,
        &user,
        &format!("{}@{}", d.user_image, user_version.to_hex()),
    )?;
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({
                "desktop": name, "writable": true, "os": os, "user": user,
                "os_version": os_version, "user_version": user_version.to_hex(),
                "holder": d.holder, "taken_from": taken_from, "leftover": leftover,
            })
        );
    } else {
        println!("desktop {name}: OS disk export {os} (over {os_image}@{os_version}; changes are thrown away)");
        println!(
            "desktop {name}: user disk export {user} (over {}; committed to the hub when this stops)",
            user_version.short()
        );
        if let Some(p) = &taken_from {
            println!("(taken from point {p}: it keeps its unsynced changes as a recovery branch at its next contact)");
        }
        if let Some(r) = leftover.as_ref().and_then(|l| l.recovery.as_ref()) {
            println!("(a killed serve's changes could not go to main: kept as {r})");
        }
    }
    crate::serve::serve(store.clone(), serve, ctx.json)?;

    // Stopped: check the user disk back in.
    let now = rt.block_on(client.desktop_detail(name))?;
    let ours = now.info.holder.as_deref() == Some(HUB_HOLDER);
    let settled = settle_user_session(&rt, &client, &store, &user, &d.user_image, ours)?;
    remove_session(&store, &user)?;
    remove_session(&store, &os)?;
    if ours {
        rt.block_on(client.check_in(name))
            .with_context(|| format!("releasing desktop {name}"))?;
    }
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({
                "desktop": name, "version": settled.main, "recovery": settled.recovery,
                "committed_blocks": settled.committed_blocks, "released": ours,
            })
        );
    } else {
        match (&settled.main, &settled.recovery) {
            (Some(v), _) => println!(
                "desktop {name}: the user disk is on the hub as {} ({} blocks changed; a restore point)",
                &v[..12],
                settled.committed_blocks
            ),
            (None, Some(r)) => println!(
                "desktop {name}: the user disk's main moved meanwhile; the served changes are kept as {r}"
            ),
            (None, None) => println!("desktop {name}: the user disk was not changed"),
        }
        if ours {
            println!("desktop {name} released: hand it to a point with `strata desktop transfer {name} POINT`");
        } else {
            println!(
                "desktop {name} was handed to {} meanwhile",
                now.info.holder.as_deref().unwrap_or("no one")
            );
        }
    }
    Ok(())
}
