//! # strata: the command
//!
//! Drives the store (`strata-store`), the image formats (`strata-disk`) and the block
//! layer (`strata-block`). Every command prints text for people by default and one
//! JSON document with `--json`; failures print `error: ...` (and with `--json` also
//! `{"error": ...}` on stdout) and exit non-zero.

mod bundle_cmd;
mod channel_cmd;
mod cli;
mod commands;
mod desktop_cmd;
mod export;
mod hub_cmd;
mod import;
mod output;
mod point_cmd;
mod point_desktop;
mod quickstart;
mod serve;
mod session;
mod spec;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use cli::Cli;

/// The store used when neither --store nor $STRATA_STORE is given.
pub fn default_store_path() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("strata").join("store")
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message
/// already ends with (library errors such as `{path}: {io error}` show their source).
fn error_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.ends_with(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let json = cli.json;
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            let msg = error_message(&e);
            eprintln!("error: {msg}");
            if json {
                output::print_json(&serde_json::json!({ "error": msg }));
            }
            ExitCode::FAILURE
        }
    }
}
