//! One function per command: resolve arguments, call the library, print the result.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_store::tree;
use strata_store::{RefKind, Store, Version, VersionId};

use crate::cli::{Cli, Command, RefCommand, SessionCommand};
use crate::output::{self, bytes, print_json};
use crate::spec::{branch_target, rev_spec};

pub struct Ctx {
    pub store_path: PathBuf,
    pub json: bool,
    pub quiet: bool,
}

impl Ctx {
    pub fn open(&self) -> Result<Arc<Store>> {
        Ok(Arc::new(Store::open(&self.store_path)?))
    }

    /// Progress displays are for people at a terminal.
    pub fn hide_progress(&self) -> bool {
        self.json || self.quiet
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let ctx = Ctx {
        store_path: cli.store.clone().unwrap_or_else(crate::default_store_path),
        json: cli.json,
        quiet: cli.quiet,
    };
    match cli.command {
        Command::Init { path } => init(&ctx, path.as_deref().unwrap_or(&ctx.store_path)),
        Command::Import(a) => {
            let store = ctx.open()?;
            let (image, branch) = branch_target(&a.target)?;
            let format = a
                .format
                .as_deref()
                .map(|f| f.parse::<strata_disk::Format>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let req = crate::import::ImportRequest {
                file: &a.file,
                image: &image,
                branch: &branch,
                message: &a.message,
                author: a.author.clone().unwrap_or_else(default_author),
                format,
                block_size: a.block_size,
                max_backing_depth: a.max_backing_depth,
                quiet: ctx.hide_progress(),
            };
            let r = crate::import::import(&store, &req)
                .with_context(|| format!("importing {}", a.file.display()))?;
            if ctx.json {
                print_json(&r);
            } else {
                println!(
                    "{}:{} {} ({}; {} virtual, {} data, {} new stored, {} blocks reused) in {:.1}s",
                    r.image,
                    r.branch,
                    &r.version[..12],
                    r.format,
                    bytes(r.virtual_size),
                    bytes(r.stats.data_bytes),
                    bytes(r.stats.new_stored_bytes),
                    r.stats.reused_chunks,
                    r.seconds
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(a) => {
            let store = ctx.open()?;
            let spec = rev_spec(&a.spec)?;
            let id = store.resolve(&spec.image, spec.rev.as_deref())?;
            let format: strata_disk::Format =
                a.format.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let r =
                crate::export::export(store, id, &a.file, format, a.force, ctx.hide_progress())?;
            if ctx.json {
                print_json(&r);
            } else {
                println!(
                    "{} -> {} ({}, {} virtual, {} data) in {:.1}s",
                    &r.version[..12],
                    r.file.display(),
                    r.format,
                    bytes(r.virtual_size),
                    bytes(r.data_bytes),
                    r.seconds
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Images => images(&ctx),
        Command::Log { spec, max_count } => log(&ctx, &spec, max_count),
        Command::Show { spec } => show(&ctx, &spec),
        Command::Tag(c) => refs(&ctx, RefKind::Tag, c),
        Command::Branch(c) => refs(&ctx, RefKind::Branch, c),
        Command::Clone { from, new } => {
            let store = ctx.open()?;
            let spec = rev_spec(&from)?;
            let id = store.resolve(&spec.image, spec.rev.as_deref())?;
            store.clone_image(&new, &id)?;
            if ctx.json {
                print_json(&serde_json::json!({"image": new, "version": id.to_hex()}));
            } else {
                println!("{new}:main -> {}", id.short());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { image } => {
            let store = ctx.open()?;
            store.delete_image(&image)?;
            if ctx.json {
                print_json(&serde_json::json!({"deleted": image}));
            } else {
                println!("deleted image {image} (run gc to reclaim its space)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { a, b, stat } => diff(&ctx, &a, &b, stat),
        Command::Stats => stats(&ctx),
        Command::Gc => gc(&ctx),
        Command::Verify => verify(&ctx),
        Command::Quickstart { dir, stop } => crate::quickstart::run(&ctx, dir, stop),
        Command::Serve {
            listen,
            socket,
            tls_dir,
            tls_required,
            default_export,
            cache,
        } => {
            let store = ctx.open()?;
            crate::serve::serve(
                store,
                crate::serve::ServeArgs {
                    default_export,
                    cache: cache.config(),
                    listen,
                    sockets: socket,
                    tls_dir,
                    tls_required,
                },
                ctx.json,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Session(c) => session(&ctx, c),
        Command::Bundle(c) => crate::bundle_cmd::run(&ctx, c),
        Command::Channel(c) => crate::channel_cmd::run(&ctx, c),
        Command::Desktop(c) => crate::desktop_cmd::run(&ctx, c),
        Command::Hub(c) => crate::hub_cmd::run(&ctx, c),
        Command::Point(c) => crate::point_cmd::run(&ctx, c),
    }
}

fn session(ctx: &Ctx, cmd: SessionCommand) -> Result<ExitCode> {
    use crate::session as s;
    let store = ctx.open()?;
    match cmd {
        SessionCommand::Create { name, from } => {
            let info = s::create(&store, &name, &from)?;
            if ctx.json {
                print_json(&info);
            } else {
                println!(
                    "session {} over {} ({}), commits go to {}",
                    info.name,
                    from,
                    &info.base[..12],
                    info.branch
                        .as_ref()
                        .map_or("the branch named at commit".into(), |b| format!(
                            "{}:{b}",
                            info.image
                        ))
                );
            }
        }
        SessionCommand::Ls => {
            let rows = s::list(&store)?;
            if ctx.json {
                print_json(&rows);
            } else {
                for r in rows {
                    let (written, used) = match &r.delta {
                        Some(d) => (
                            bytes(d.data_blocks * d.block_size as u64),
                            match (d.in_use, r.clients) {
                                (false, _) => "idle".to_string(),
                                (true, 1) => "served, 1 client".to_string(),
                                (true, n) => format!("served, {n} clients"),
                            },
                        ),
                        None => ("?".into(), "delta missing".to_string()),
                    };
                    let streaming = match &r.streaming {
                        Some(l) => {
                            format!(", base streaming from the hub ({:.0}% local)", l.percent())
                        }
                        None => String::new(),
                    };
                    println!(
                        "{:<20} {}@{}  written {:>10}  {used}{streaming}",
                        r.session.name,
                        r.session.image,
                        &r.session.base[..12.min(r.session.base.len())],
                        written,
                    );
                }
            }
        }
        SessionCommand::Commit {
            name,
            message,
            branch,
        } => {
            let v = s::commit_cmd(&store, &name, &message, branch, &default_author())?;
            if ctx.json {
                print_json(&v);
            } else {
                println!(
                    "{}:{} {} ({} blocks committed)",
                    v["image"].as_str().unwrap_or(""),
                    v["branch"].as_str().unwrap_or(""),
                    &v["version"].as_str().unwrap_or("")
                        [..12.min(v["version"].as_str().unwrap_or("").len())],
                    v["committed_blocks"]
                );
            }
        }
        SessionCommand::Reset { name } => {
            s::reset_cmd(&store, &name)?;
            if ctx.json {
                print_json(&serde_json::json!({"session": name, "reset": true}));
            } else {
                println!("session {name} is back at its base");
            }
        }
        SessionCommand::Rm { name } => {
            s::remove(&store, &name)?;
            if ctx.json {
                print_json(&serde_json::json!({"deleted": name}));
            } else {
                println!("deleted session {name}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn default_author() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

pub fn init(ctx: &Ctx, path: &Path) -> Result<ExitCode> {
    Store::init(path)?;
    if ctx.json {
        print_json(
            &serde_json::json!({"store": path, "format": strata_store::store::STORE_FORMAT}),
        );
    } else {
        println!("initialised an empty Strata store in {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn images(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open()?;
    let list = store.images()?;
    if ctx.json {
        print_json(&list);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no images (add one with `strata import FILE IMAGE`)");
    }
    for i in list {
        let branches: Vec<String> = i
            .branches
            .iter()
            .map(|b| format!("{}={}", b.name, &b.version[..12]))
            .collect();
        let tags: Vec<&str> = i.tags.iter().map(|t| t.name.as_str()).collect();
        let size = match i
            .branches
            .iter()
            .find(|b| b.name == strata_store::DEFAULT_BRANCH)
        {
            Some(b) => VersionId::from_hex(&b.version)
                .and_then(|v| store.load_version(&v).ok())
                .map(|v| bytes(v.virtual_size))
                .unwrap_or_default(),
            None => String::new(),
        };
        println!(
            "{:<24} {:>10}  blocks {:>8}  branches: {}{}",
            i.name,
            size,
            bytes(i.block_size as u64),
            branches.join(" "),
            if tags.is_empty() {
                String::new()
            } else {
                format!("  tags: {}", tags.join(" "))
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct VersionOut {
    id: String,
    #[serde(flatten)]
    version: Version,
}

fn log(ctx: &Ctx, spec: &str, max: usize) -> Result<ExitCode> {
    let store = ctx.open()?;
    let spec = rev_spec(spec)?;
    let id = store.resolve(&spec.image, spec.rev.as_deref())?;
    let hist = store.history(&id, max)?;
    if ctx.json {
        let out: Vec<VersionOut> = hist
            .into_iter()
            .map(|(id, version)| VersionOut {
                id: id.to_hex(),
                version,
            })
            .collect();
        print_json(&out);
        return Ok(ExitCode::SUCCESS);
    }
    for (id, v) in hist {
        println!("version {id}");
        println!("Author: {}", v.author);
        println!("Date:   {}", output::time(v.time));
        println!(
            "Size:   {} virtual, {} data",
            bytes(v.virtual_size),
            bytes(v.data_bytes)
        );
        if !v.message.is_empty() {
            println!("\n    {}", v.message.replace('\n', "\n    "));
        }
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn show(ctx: &Ctx, spec: &str) -> Result<ExitCode> {
    let store = ctx.open()?;
    let spec = rev_spec(spec)?;
    let id = store.resolve(&spec.image, spec.rev.as_deref())?;
    let v = store.load_version(&id)?;
    let mut names = Vec::new();
    for img in store.images()? {
        for b in &img.branches {
            if b.version == id.to_hex() {
                names.push(format!("{}:{}", img.name, b.name));
            }
        }
        for t in &img.tags {
            if t.version == id.to_hex() {
                names.push(format!("{}@{}", img.name, t.name));
            }
        }
    }
    let blocks = v.blocks();
    if ctx.json {
        print_json(&serde_json::json!({
            "id": id.to_hex(),
            "refs": names,
            "blocks": blocks,
            "unwritten_blocks": blocks - v.data_blocks - v.zero_blocks,
            "version": v,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    println!("version   {id}");
    println!("refs      {}", names.join(", "));
    println!("image     {}", v.image);
    println!("parents   {}", v.parents.join(" "));
    println!("date      {}", output::time(v.time));
    println!("author    {}", v.author);
    println!("message   {}", v.message);
    println!(
        "size      {} ({} bytes)",
        bytes(v.virtual_size),
        v.virtual_size
    );
    println!("blocks    {} of {}", blocks, bytes(v.block_size as u64));
    println!(
        "          {} data ({}), {} zero, {} never written",
        v.data_blocks,
        bytes(v.data_bytes),
        v.zero_blocks,
        blocks - v.data_blocks - v.zero_blocks
    );
    println!("tree      root {} depth {}", v.root, v.depth);
    Ok(ExitCode::SUCCESS)
}

fn refs(ctx: &Ctx, kind: RefKind, cmd: RefCommand) -> Result<ExitCode> {
    let store = ctx.open()?;
    match cmd {
        RefCommand::Ls { image } => {
            store.image(&image)?;
            let list = store.refs(&image, kind)?;
            if ctx.json {
                print_json(&list);
            } else {
                for r in list {
                    println!(
                        "{:<24} {}  {}",
                        r.name,
                        &r.version[..12],
                        output::time(r.updated)
                    );
                }
            }
        }
        RefCommand::Add { spec, name } => {
            let spec = rev_spec(&spec)?;
            let id = store.resolve(&spec.image, spec.rev.as_deref())?;
            store.create_ref(&spec.image, kind, &name, &id)?;
            if ctx.json {
                print_json(
                    &serde_json::json!({"image": spec.image, kind.as_str(): name, "version": id.to_hex()}),
                );
            } else {
                println!(
                    "{} {name} of {} -> {}",
                    kind.as_str(),
                    spec.image,
                    id.short()
                );
            }
        }
        RefCommand::Rm { image, name } => {
            let was = store.delete_ref(&image, kind, &name)?;
            if ctx.json {
                print_json(
                    &serde_json::json!({"image": image, "deleted": name, "was": was.to_hex()}),
                );
            } else {
                println!(
                    "deleted {} {name} of {image} (was {})",
                    kind.as_str(),
                    was.short()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
pub struct Range {
    offset: u64,
    length: u64,
}

#[derive(Serialize)]
pub struct DiffOut {
    a: String,
    b: String,
    a_size: u64,
    b_size: u64,
    block_size: u32,
    changed_blocks: u64,
    changed_bytes: u64,
    ranges: Vec<Range>,
}

/// Compare two revisions: the byte ranges whose content differs.
pub fn diff_report(store: &Store, a: &str, b: &str) -> Result<DiffOut> {
    let (sa, sb) = (rev_spec(a)?, rev_spec(b)?);
    let ia = store.resolve(&sa.image, sa.rev.as_deref())?;
    let ib = store.resolve(&sb.image, sb.rev.as_deref())?;
    let (va, vb) = (store.load_version(&ia)?, store.load_version(&ib)?);
    if va.block_size != vb.block_size {
        bail!(
            "{a} has {} blocks and {b} {}: versions with different block sizes cannot be compared block by block",
            bytes(va.block_size as u64),
            bytes(vb.block_size as u64)
        );
    }
    let bs = va.block_size as u64;
    let end = va.virtual_size.max(vb.virtual_size);
    let mut out = DiffOut {
        a: ia.to_hex(),
        b: ib.to_hex(),
        a_size: va.virtual_size,
        b_size: vb.virtual_size,
        block_size: va.block_size,
        changed_blocks: 0,
        changed_bytes: 0,
        ranges: Vec::new(),
    };
    let mut load = |id: &strata_store::ChunkId| store.load_node(id);
    tree::diff(&mut load, va.tree(), vb.tree(), &mut |start, count| {
        let offset = start * bs;
        let length = (count * bs).min(end - offset);
        out.changed_blocks += count;
        out.changed_bytes += length;
        out.ranges.push(Range { offset, length });
        Ok::<(), strata_store::StoreError>(())
    })?;
    Ok(out)
}

fn diff(ctx: &Ctx, a: &str, b: &str, stat: bool) -> Result<ExitCode> {
    let store = ctx.open()?;
    let out = diff_report(&store, a, b)?;
    if ctx.json {
        print_json(&out);
        return Ok(ExitCode::SUCCESS);
    }
    if !stat {
        for r in &out.ranges {
            println!("{:#014x} +{:#x}  ({})", r.offset, r.length, bytes(r.length));
        }
    }
    if out.a_size != out.b_size {
        println!(
            "size changed: {} -> {}",
            bytes(out.a_size),
            bytes(out.b_size)
        );
    }
    println!(
        "{} changed in {} ranges ({} blocks)",
        bytes(out.changed_bytes),
        out.ranges.len(),
        out.changed_blocks
    );
    Ok(ExitCode::SUCCESS)
}

fn stats(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open()?;
    let s = strata_store::stats::stats(&store)?;
    if ctx.json {
        print_json(&s);
        return Ok(ExitCode::SUCCESS);
    }
    println!("images              {}", s.images);
    println!("versions            {}", s.versions);
    println!(
        "logical size        {} (all versions)",
        bytes(s.logical_bytes)
    );
    println!("logical data        {}", bytes(s.logical_data_bytes));
    println!(
        "unique data         {} in {} blocks",
        bytes(s.unique_bytes),
        s.unique_chunks
    );
    println!("stored data         {}", bytes(s.stored_data_bytes));
    println!("stored metadata     {}", bytes(s.stored_metadata_bytes));
    println!(
        "stored in total     {} in {} packs",
        bytes(s.stored_bytes),
        s.packs
    );
    println!("dedup ratio         {:.2}x", s.dedup_ratio);
    println!("compression ratio   {:.2}x", s.compression_ratio);
    if s.stored_bytes > 0 {
        println!(
            "overall             {:.2}x",
            s.logical_data_bytes as f64 / s.stored_bytes as f64
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open()?;
    let sp = output::spinner("gc", ctx.hide_progress());
    let r = strata_store::gc::gc(&store, &mut |phase| {
        sp.set_message(format!("gc: {}", phase.describe()))
    })?;
    sp.finish_and_clear();
    if ctx.json {
        print_json(&r);
    } else {
        print_gc(&r);
    }
    Ok(ExitCode::SUCCESS)
}

/// What a gc did, for people.
pub(crate) fn print_gc(r: &strata_store::gc::GcReport) {
    println!(
        "gc: {} objects live, {} deleted, {} versions dropped; packs: {} deleted, {} rewritten, {} orphans removed; {} -> {}",
        r.marked_objects,
        r.deleted_objects,
        r.deleted_versions,
        r.packs_deleted,
        r.packs_rewritten,
        r.orphan_packs_deleted,
        bytes(r.bytes_before),
        bytes(r.bytes_after)
    );
    if r.dead_sessions > 0 {
        println!(
            "gc: cleaned up after {} interrupted writers",
            r.dead_sessions
        );
    }
}

fn verify(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open()?;
    let total = store.pack_bytes()?;
    let bar = output::byte_bar(total, "verify", ctx.hide_progress());
    let r = strata_store::verify::verify(&store, &|done| bar.set_position(done))?;
    bar.finish_and_clear();
    if ctx.json {
        print_json(&serde_json::json!({"ok": r.ok(), "report": r}));
    } else {
        println!(
            "checked {} packs, {} objects, {}, {} versions",
            r.packs,
            r.objects,
            bytes(r.bytes),
            r.versions
        );
        for p in &r.bad_packs {
            println!("BAD PACK {}: {}", p.pack, p.reason);
        }
        for d in &r.damaged {
            println!(
                "DAMAGED {} {} in {} at offset {}: {}",
                d.kind, d.id, d.pack, d.offset, d.reason
            );
            for v in &d.affects {
                println!("    affects version {v}");
            }
        }
        for m in &r.missing {
            println!("MISSING object {m}");
        }
        for v in &r.affected_versions {
            println!(
                "AFFECTED version {} ({}) by {} object(s)",
                v.version,
                if v.refs.is_empty() {
                    "history".to_string()
                } else {
                    v.refs.join(", ")
                },
                v.objects.len()
            );
        }
        for d in &r.dangling_refs {
            println!("DANGLING ref {d}");
        }
        if r.unclaimed_packs > 0 {
            println!(
                "{} unclaimed pack file(s) (left by interrupted writers; gc removes them)",
                r.unclaimed_packs
            );
        }
        println!("{}", if r.ok() { "store OK" } else { "store DAMAGED" });
    }
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
