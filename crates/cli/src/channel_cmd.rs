//! `strata channel ...`: release channels on a hub (see `strata_hub::channels` for
//! the model: a log per channel, moved by compare-and-swap, every change audited).

use std::process::ExitCode;

use anyhow::Result;
use strata_sync::api::{ChannelInfo, PromoteRequest, PublishRequest, RollbackRequest};

use crate::cli::ChannelCommand;
use crate::commands::Ctx;
use crate::hub_cmd::{admin_client, runtime};
use crate::output::{print_json, time};
use crate::spec::rev_spec;

fn short(v: &str) -> &str {
    &v[..12.min(v.len())]
}

fn moved(ctx: &Ctx, verb: &str, c: &ChannelInfo) {
    if ctx.json {
        print_json(c);
    } else {
        println!(
            "{} -> {}@{} ({verb}, #{})",
            c.name,
            c.image,
            short(&c.version),
            c.seq
        );
    }
}

pub fn run(ctx: &Ctx, cmd: ChannelCommand) -> Result<ExitCode> {
    let rt = runtime()?;
    match cmd {
        ChannelCommand::Publish {
            spec,
            channel,
            expect_seq,
            access,
        } => {
            let s = rev_spec(&spec)?;
            let req = PublishRequest {
                channel,
                image: s.image,
                rev: s.rev.unwrap_or_else(|| "main".into()),
                expected_seq: expect_seq,
            };
            let c = rt.block_on(admin_client(&access)?.publish(&req))?;
            moved(ctx, "published", &c);
        }
        ChannelCommand::Promote {
            from,
            to,
            expect_seq,
            access,
        } => {
            let req = PromoteRequest {
                from,
                to,
                expected_seq: expect_seq,
            };
            let c = rt.block_on(admin_client(&access)?.promote(&req))?;
            moved(ctx, "promoted", &c);
        }
        ChannelCommand::Rollback {
            channel,
            expect_seq,
            access,
        } => {
            let req = RollbackRequest {
                channel,
                expected_seq: expect_seq,
            };
            let c = rt.block_on(admin_client(&access)?.rollback(&req))?;
            moved(ctx, "rolled back", &c);
        }
        ChannelCommand::Log { channel, access } => {
            let mut log = rt.block_on(admin_client(&access)?.channel_log(&channel))?;
            log.reverse();
            if ctx.json {
                print_json(&log);
            } else {
                for e in log {
                    println!(
                        "#{:<4} {}  {:<9} {}@{}{}  by {}{}",
                        e.seq,
                        time(e.time),
                        e.action,
                        e.image,
                        short(&e.version),
                        e.previous
                            .as_deref()
                            .map(|p| format!(" (was {})", short(p)))
                            .unwrap_or_default(),
                        e.actor,
                        if e.detail.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", e.detail)
                        }
                    );
                }
            }
        }
        ChannelCommand::Ls { access } => {
            let list = rt.block_on(admin_client(&access)?.channels())?;
            if ctx.json {
                print_json(&list);
            } else {
                for c in list {
                    println!(
                        "{:<28} {}@{}  #{}  {} by {}",
                        c.name,
                        c.image,
                        short(&c.version),
                        c.seq,
                        time(c.time),
                        c.actor
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
