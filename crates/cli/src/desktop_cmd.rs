//! `strata desktop ...`: operators manage desktops on a hub (see
//! `strata_hub::desktops`: one writer at a time, recovery branches after a forced
//! transfer).

use std::process::ExitCode;

use anyhow::Result;
use strata_sync::api::{CreateDesktopRequest, DesktopInfo};

use crate::cli::DesktopCommand;
use crate::commands::Ctx;
use crate::hub_cmd::{admin_client, runtime};
use crate::output::{print_json, time};

fn short(v: &Option<String>) -> &str {
    v.as_deref().map_or("-", |v| &v[..12.min(v.len())])
}

fn line(d: &DesktopInfo) -> String {
    format!(
        "{:<20} channel {} (os {}@{})  user {}  {}",
        d.name,
        d.channel,
        d.os_image.as_deref().unwrap_or("-"),
        short(&d.os_version),
        short(&d.user_version),
        match &d.holder {
            Some(h) => format!(
                "checked out to {h}{}",
                d.holder_last_seen
                    .map(|t| format!(", last contact {}", time(t)))
                    .unwrap_or_default()
            ),
            None => "not checked out".to_string(),
        }
    )
}

fn show(ctx: &Ctx, d: &DesktopInfo) {
    if ctx.json {
        print_json(d);
    } else {
        println!("{}", line(d));
    }
}

pub fn run(ctx: &Ctx, cmd: DesktopCommand) -> Result<ExitCode> {
    let rt = runtime()?;
    match cmd {
        DesktopCommand::Create {
            name,
            channel,
            size,
            template,
            access,
        } => {
            if size.is_none() && template.is_none() {
                anyhow::bail!("give the user disk a --size (e.g. 20G) or a --template IMAGE@REV");
            }
            let req = CreateDesktopRequest {
                name,
                channel,
                size,
                template,
                block_size: None,
            };
            let d = rt.block_on(admin_client(&access)?.create_desktop(&req))?;
            show(ctx, &d);
        }
        DesktopCommand::Ls { access } => {
            let list = rt.block_on(admin_client(&access)?.desktops())?;
            if ctx.json {
                print_json(&list);
            } else {
                for d in &list {
                    println!("{}", line(d));
                }
            }
        }
        DesktopCommand::Show { name, access } => {
            let d = rt.block_on(admin_client(&access)?.desktop(&name))?;
            if ctx.json {
                print_json(&d);
            } else {
                println!("desktop      {}", d.name);
                println!("channel      {}", d.channel);
                println!(
                    "os disk      {}@{}",
                    d.os_image.as_deref().unwrap_or("-"),
                    d.os_version.as_deref().unwrap_or("-")
                );
                println!(
                    "user disk    {}@{}{}",
                    d.user_image,
                    d.user_version.as_deref().unwrap_or("-"),
                    d.user_time
                        .map(|t| format!(" (synced {})", time(t)))
                        .unwrap_or_default()
                );
                match &d.holder {
                    Some(h) => println!(
                        "checked out  to {h} since {}{} (epoch {})",
                        d.holder_since.map(time).unwrap_or_default(),
                        d.holder_last_seen
                            .map(|t| format!(", last contact {}", time(t)))
                            .unwrap_or_default(),
                        d.epoch
                    ),
                    None => println!("checked out  no"),
                }
            }
        }
        DesktopCommand::Rm { name, access } => {
            rt.block_on(admin_client(&access)?.remove_desktop(&name))?;
            if ctx.json {
                print_json(&serde_json::json!({ "removed": name }));
            } else {
                println!("desktop {name} removed (its user disk goes at the hub's next gc)");
            }
        }
        DesktopCommand::Restore { name, to, access } => {
            let r = rt.block_on(admin_client(&access)?.restore_desktop(&name, &to))?;
            if ctx.json {
                print_json(&r);
            } else {
                println!(
                    "{name}: user disk restored to {} as {} (undo: --to {})",
                    &r.restored_from[..12],
                    &r.version[..12],
                    &r.previous[..12]
                );
            }
        }
        DesktopCommand::RestorePoints { name, access } => {
            let list = rt.block_on(admin_client(&access)?.restore_points(&name))?;
            if ctx.json {
                print_json(&list);
            } else {
                for rp in list {
                    println!("{}  {}", time(rp.time), &rp.version[..12]);
                }
            }
        }
        DesktopCommand::Transfer {
            name,
            point,
            force,
            access,
        } => {
            let d = rt.block_on(admin_client(&access)?.transfer_desktop(&name, &point, force))?;
            show(ctx, &d);
        }
    }
    Ok(ExitCode::SUCCESS)
}
