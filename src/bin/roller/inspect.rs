//! The flags and output of the commands that look at the fleet without changing it (`check`,
//! `status`, `history`), apart from the rest of the command line to keep each file readable.

use std::path::PathBuf;

use clap::Args;

use roller::commands;
use roller::commands::check::CheckRequest;
use roller::commands::history::HistoryRequest;
use roller::commands::status::StatusRequest;
use roller::error::Error;
use roller::inventory::Inventory;

use super::{Common, Output, Select, exit, json_event, load_inventory, quiet};

#[derive(Args)]
pub struct SelectArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    select: Select,
}

#[derive(Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    select: Select,
    /// The jar a rollout would upload: every host must have room for it [default: only
    /// pre-flight's margin of 10 MiB].
    #[arg(long, short = 'a')]
    artifact: Option<PathBuf>,
}

#[derive(Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    select: Select,
    /// Show the newest N rollouts.
    #[arg(short = 'n', long = "limit", value_name = "N", default_value_t = 20)]
    limit: usize,
}

pub async fn history(args: &HistoryArgs) -> Result<u8, Error> {
    let selection = args.select.to_lib();
    // Only a selection needs the hosts; the history itself is on the lock host alone.
    let inventory = if selection.is_all() {
        Inventory::load(&args.common.inventory)?
    } else {
        load_inventory(&args.common).await?
    };
    let history = commands::history::history(HistoryRequest {
        inventory,
        limit: args.limit,
        selection,
    })
    .await?;
    match args.common.output {
        Output::Json => println!(
            "{}",
            json_event("history", serde_json::json!({ "history": history }))
        ),
        Output::Text => print!("{}", history.render_text()),
    }
    Ok(exit::OK)
}

pub async fn check(args: &CheckArgs) -> Result<u8, Error> {
    let report = commands::check::check(CheckRequest {
        inventory: load_inventory(&args.common).await?,
        inventory_path: args.common.inventory.clone(),
        selection: args.select.to_lib(),
        artifact: args.artifact.clone(),
    })
    .await?;
    match args.common.output {
        Output::Json => println!(
            "{}",
            json_event("check", serde_json::json!({ "check": report }))
        ),
        Output::Text if quiet() && report.ready => {}
        Output::Text => print!("{}", report.render_text()),
    }
    Ok(if report.ready {
        exit::OK
    } else {
        exit::PREFLIGHT
    })
}

pub async fn status(args: &SelectArgs) -> Result<u8, Error> {
    let status = commands::status::status(StatusRequest {
        inventory: load_inventory(&args.common).await?,
        inventory_path: args.common.inventory.clone(),
        selection: args.select.to_lib(),
    })
    .await?;
    match args.common.output {
        Output::Json => println!(
            "{}",
            json_event("status", serde_json::json!({ "status": status }))
        ),
        Output::Text => print!("{}", status.render_text()),
    }
    Ok(exit::OK)
}
