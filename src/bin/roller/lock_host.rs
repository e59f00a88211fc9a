//! The flags and output of the commands that speak only to the lock host (`unlock`, `promote`,
//! `abort`): they connect nowhere else and load the inventory without discovery.

use clap::Args;

use roller::commands;
use roller::commands::canary_decision::{self, Decision};
use roller::error::Error;
use roller::inventory::Inventory;

use super::{Common, Output, exit, json_event};

#[derive(Args)]
pub struct UnlockArgs {
    #[command(flatten)]
    pub common: Common,
}

pub async fn decide(args: &UnlockArgs, decision: Decision) -> Result<u8, Error> {
    let inventory = Inventory::load(&args.common.inventory)?;
    let state = canary_decision::decide(&inventory, decision).await?;
    let decision = decision.as_str();
    match args.common.output {
        Output::Json => println!(
            "{}",
            json_event(
                decision,
                serde_json::json!({ "rollout": state.id, "release": state.release })
            )
        ),
        Output::Text => println!(
            "told rollout {} of {} to {decision}",
            state.id, state.release
        ),
    }
    Ok(exit::OK)
}

pub async fn unlock(args: &UnlockArgs) -> Result<u8, Error> {
    let inventory = Inventory::load(&args.common.inventory)?;
    let removed = commands::unlock::unlock(&inventory).await?;
    match (&removed, args.common.output) {
        (_, Output::Json) => println!(
            "{}",
            json_event("unlocked", serde_json::json!({ "removed": removed }))
        ),
        (Some(holder), Output::Text) => println!("removed the deploy lock held by {holder}"),
        (None, Output::Text) => println!("there was no deploy lock"),
    }
    Ok(exit::OK)
}
