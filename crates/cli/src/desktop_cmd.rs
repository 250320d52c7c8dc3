//! `strata desktop ...`: operators manage desktops on a hub (see
//! `strata_hub::desktops`: one writer at a time, recovery branches after a forced
//! transfer, OS resets applied at the holder's next start, and the holder's reports
//! of what it runs).
//!
//! `show` and `ls` put the hub's view (where the channel points, the user disk's
//! newest synced version) beside the holding point's last report (the OS version it
//! runs, its user disk's local and pushed versions, bytes the hub lacks, when it
//! last synced).

use std::process::ExitCode;

use anyhow::Result;
use strata_sync::api::{CreateDesktopRequest, DesktopDetail, DesktopInfo, HUB_HOLDER};

use crate::cli::DesktopCommand;
use crate::commands::Ctx;
use crate::hub_cmd::{admin_client, runtime};
use crate::output::{bytes, print_json, time};

fn short(v: &Option<String>) -> &str {
    v.as_deref().map_or("-", |v| &v[..12.min(v.len())])
}

fn short_str(v: &str) -> &str {
    &v[..12.min(v.len())]
}

/// How long ago `t` was, for people.
fn ago(t: i64) -> String {
    let s = (strata_store::catalog::now() - t).max(0);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

/// The holder's side in one line (empty without a report).
fn point_summary(d: &DesktopDetail) -> String {
    let Some(p) = &d.point else {
        return String::new();
    };
    let r = &p.report;
    format!(
        "  [{}: user {}{}, pending {}, reported {}]",
        p.point,
        short(&r.user_version),
        if r.user_version != d.info.user_version {
            " (not on the hub)"
        } else {
            ""
        },
        bytes(r.pending_bytes),
        ago(p.received)
    )
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
            Some(h) if h == HUB_HOLDER => "served by the hub (hub desktop serve --writable)".into(),
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

/// `desktop show` as text: the hub's side, then the holder's report.
fn show_detail(d: &DesktopDetail) {
    let i = &d.info;
    println!("desktop      {}", i.name);
    println!("channel      {}", i.channel);
    println!("on the hub");
    println!(
        "  os disk    {}@{} (where the channel points)",
        i.os_image.as_deref().unwrap_or("-"),
        i.os_version.as_deref().unwrap_or("-")
    );
    println!(
        "  user disk  {}@{}{}",
        i.user_image,
        i.user_version.as_deref().unwrap_or("-"),
        i.user_time
            .map(|t| format!(" (synced {}, {})", time(t), ago(t)))
            .unwrap_or_default()
    );
    match &i.holder {
        Some(h) if h == HUB_HOLDER => println!(
            "checked out  to the hub itself since {} (`strata hub desktop serve --writable`; epoch {})",
            i.holder_since.map(time).unwrap_or_default(),
            i.epoch
        ),
        Some(h) => println!(
            "checked out  to {h} since {}{} (epoch {})",
            i.holder_since.map(time).unwrap_or_default(),
            i.holder_last_seen
                .map(|t| format!(", last contact {}", time(t)))
                .unwrap_or_default(),
            i.epoch
        ),
        None => println!("checked out  no"),
    }
    if d.os_reset > 0 {
        println!(
            "os resets    {} requested, the last by {} at {}",
            d.os_reset,
            d.os_reset_by.as_deref().unwrap_or("?"),
            d.os_reset_time.map(time).unwrap_or_default()
        );
    }
    let Some(p) = &d.point else {
        if i.holder.as_deref().is_some_and(|h| h != HUB_HOLDER) {
            println!("on the point (no report yet)");
        }
        return;
    };
    let r = &p.report;
    println!(
        "on {} (reported {}, {})",
        p.point,
        time(p.received),
        ago(p.received)
    );
    let os_note = match (&r.os_version, &i.os_version) {
        (Some(a), Some(b)) if a != b => " (the channel moved: switches at its next start)",
        _ if r.os_reset < d.os_reset => {
            " (an OS reset is pending: applied at its next start, never under a running VM)"
        }
        _ => "",
    };
    println!(
        "  os disk    {}{}",
        r.os_version.as_deref().unwrap_or("-"),
        os_note
    );
    println!(
        "  user disk  {}{}{}",
        r.user_version.as_deref().unwrap_or("-"),
        if r.user_version != i.user_version {
            " (ahead of the hub)"
        } else {
            " (as on the hub)"
        },
        r.last_commit
            .map(|t| format!(", committed {}", time(t)))
            .unwrap_or_default()
    );
    println!(
        "  pushed     {}{}",
        r.user_pushed.as_deref().map(short_str).unwrap_or("-"),
        r.last_push
            .map(|t| format!(" at {}", time(t)))
            .unwrap_or_default()
    );
    println!(
        "  pending    {} ({} committed, not pushed; {} written since the last commit){}",
        bytes(r.pending_bytes),
        bytes(r.unpushed_bytes),
        bytes(r.uncommitted_bytes),
        if r.streaming {
            "; its base is still streaming"
        } else {
            ""
        }
    );
    println!(
        "  last sync  {}",
        r.last_sync
            .map(|t| format!("{} ({})", time(t), ago(t)))
            .unwrap_or_else(|| "never".into())
    );
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
            let list = rt.block_on(admin_client(&access)?.desktops_detail())?;
            if ctx.json {
                print_json(&list);
            } else {
                for d in &list {
                    println!("{}{}", line(&d.info), point_summary(d));
                }
            }
        }
        DesktopCommand::Show { name, access } => {
            let d = rt.block_on(admin_client(&access)?.desktop_detail(&name))?;
            if ctx.json {
                print_json(&d);
            } else {
                show_detail(&d);
            }
        }
        DesktopCommand::ResetOs { name, access } => {
            let d = rt.block_on(admin_client(&access)?.reset_desktop_os(&name))?;
            if ctx.json {
                print_json(&d);
            } else {
                let who = match d.info.holder.as_deref() {
                    // It starts every serve from the channel's version anyway.
                    Some(h) if h == HUB_HOLDER => "the hub's own serve".to_string(),
                    Some(h) => format!("point {h}"),
                    None => "the next point to start it".to_string(),
                };
                println!(
                    "desktop {name}: OS reset #{} requested; {who} drops the OS disk's \
                     changes and starts it from the channel's version {} at the desktop's \
                     next start (a running VM keeps its disk until then)",
                    d.os_reset,
                    short(&d.info.os_version)
                );
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
