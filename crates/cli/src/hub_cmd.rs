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

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use strata_store::Store;
use strata_sync::{ClientConfig, HubClient, PushOptions};

use crate::cli::{HubAccess, HubCommand, HubDesktopCommand};
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
        } => hub_run(
            ctx,
            &dir,
            &listen,
            tls_cert.zip(tls_key),
            insecure,
            retention.as_deref(),
        )?,
        HubCommand::Desktop(HubDesktopCommand::Serve {
            name,
            listen,
            socket,
            access,
        }) => desktop_serve(ctx, &name, listen, socket, &access)?,
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
) -> Result<()> {
    let mut cfg = strata_hub::HubConfig::new(dir, parse_listen(listen)?);
    cfg.tls = tls;
    cfg.insecure = insecure;
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

/// `hub desktop serve`: the desktop's disks as they are on the hub, read-only.
fn desktop_serve(
    ctx: &Ctx,
    name: &str,
    listen: Vec<String>,
    sockets: Vec<PathBuf>,
    access: &HubAccess,
) -> Result<()> {
    let Some(dir) = &access.dir else {
        bail!("give the hub's directory with --dir (its store is served)");
    };
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
    crate::serve::serve(
        store,
        crate::serve::ServeArgs {
            default_export: None,
            listen: if listen.is_empty() && sockets.is_empty() {
                vec!["127.0.0.1:10809".into()]
            } else {
                listen
            },
            sockets,
            tls_dir: None,
            tls_required: false,
        },
        ctx.json,
    )
}
