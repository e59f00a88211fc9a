//! The `roller` command line: parses flags, wires the library together, and is the only place
//! where outcomes become exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

mod deploy;
mod inspect;
mod lock_host;

use roller::commands::canary_decision::Decision;
use roller::discovery;
use roller::error::Error;
use roller::inventory::Inventory;
use roller::report::{Outcome, json_event};
use roller::selection::Selection;

/// Exit codes, documented in the README.
mod exit {
    pub const OK: u8 = 0;
    pub const INTERNAL: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const PREFLIGHT: u8 = 3;
    pub const ROLLED_BACK: u8 = 4;
    pub const ROLLBACK_INCOMPLETE: u8 = 5;
    pub const HALTED: u8 = 6;
    pub const LOCKED: u8 = 7;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "roller",
    version,
    about = "Roll a new release of a JVM service across a fleet over SSH, without dropping a request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print only errors, and the final report when a run did not succeed (with
    /// --output json: the report, no step events). For cron and release jobs.
    // Last in every command's help, wherever the command's own flags end.
    #[arg(long, short = 'q', global = true, display_order = 1000)]
    quiet: bool,
}

/// `--quiet`, set once from the command line before any command runs.
static QUIET: AtomicBool = AtomicBool::new(false);

fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

#[derive(Subcommand)]
enum Command {
    /// Print what a rollout (or, with --rollback-to, a rollback) would do, offline: no network, no SSH.
    #[command(
        after_help = "Examples:\n  roller plan -i roller.toml -a shop-2.4.0.jar --batch 25%\n  roller plan -i roller.toml --release v2 --commands\n  roller plan -i roller.toml --release v2 --output json > plan.json"
    )]
    Plan(deploy::PlanCommandArgs),
    /// Perform a rollout.
    #[command(
        after_help = "Examples:\n  roller rollout -i roller.toml -a shop-2.4.0.jar --batch 1\n  roller rollout -i roller.toml -a shop.jar --batch 25% --lock-wait 10m --output json --quiet"
    )]
    Rollout(deploy::RolloutArgs),
    /// Roll back to the release before the live one (or --to one), already on the hosts: no upload.
    #[command(
        after_help = "Examples:\n  roller rollback -i roller.toml --batch 1\n  roller rollback -i roller.toml --to shop-2.3.9-1a2b3c4d5e6f --output json"
    )]
    Rollback(deploy::RollbackArgs),
    /// Finish a rollout that was interrupted, halted, or whose controller died.
    #[command(after_help = "Example:\n  roller resume -i roller.toml")]
    Resume(deploy::ResumeArgs),
    /// Put every host back on its release from before an unfinished rollout, and in the pool.
    #[command(after_help = "Example:\n  roller recover -i roller.toml")]
    Recover(deploy::ResumeArgs),
    /// Remove the deploy lock, whoever holds it.
    #[command(
        after_help = "Example (only when `roller status` shows no live holder):\n  roller unlock -i roller.toml"
    )]
    Unlock(lock_host::UnlockArgs),
    /// Blue-green: send traffic back to the other slot (one reload, no restart).
    #[command(after_help = "Example:\n  roller switch-back -i roller.toml")]
    SwitchBack(deploy::SwitchBackArgs),
    /// Canary with --pause: let the paused rollout go on to the rest of the fleet.
    #[command(after_help = "Example:\n  roller promote -i roller.toml")]
    Promote(lock_host::UnlockArgs),
    /// Canary with --pause: roll the canary back and stop.
    #[command(after_help = "Example:\n  roller abort -i roller.toml")]
    Abort(lock_host::UnlockArgs),
    /// Check that a rollout could start: inventory, every host and load balancer, the deploy
    /// lock; changes nothing. Exit 0 only when a rollout could start.
    #[command(
        after_help = "Examples:\n  roller check -i roller.toml\n  roller check -i roller.toml --tag az-a --output json"
    )]
    Check(inspect::CheckArgs),
    /// What every host runs, its health, the pool on every load balancer, the deploy lock and
    /// an unfinished rollout; read-only: takes no lock, changes nothing.
    #[command(
        after_help = "Examples:\n  roller status -i roller.toml\n  roller status -i roller.toml --tag az-a --output json"
    )]
    Status(inspect::SelectArgs),
    /// Past rollouts, newest first: who, when, release, strategy, result, each host's outcome;
    /// kept on the lock host, read-only.
    #[command(
        after_help = "Examples:\n  roller history -i roller.toml -n 5\n  roller history -i roller.toml --hosts web-1 --output json"
    )]
    History(inspect::HistoryArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  roller completions bash > /etc/bash_completion.d/roller\n  roller completions zsh > \"${fpath[1]}/_roller\"\n  roller completions fish > ~/.config/fish/completions/roller.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args)]
struct Common {
    /// Inventory file.
    #[arg(long, short = 'i', default_value = "roller.toml")]
    inventory: PathBuf,
    /// `text` for people; `json` for release jobs (one document, or one event per line).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

/// Which hosts a command acts on.
#[derive(Args)]
struct Select {
    /// Only these hosts, by inventory name (comma-separated or repeated) [default: every host].
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    hosts: Vec<String>,
    /// Only hosts carrying one of these tags (`tags` on `[[hosts]]`); with --hosts, a host must
    /// match both.
    #[arg(long = "tag", value_delimiter = ',', value_name = "TAG,...")]
    tags: Vec<String>,
}

impl Select {
    fn to_lib(&self) -> Selection {
        Selection {
            hosts: self.hosts.clone(),
            tags: self.tags.clone(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    QUIET.store(cli.quiet, Ordering::Relaxed);
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "roller",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROLLER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let output = match &cli.command {
        Command::Plan(a) => a.plan.common.output,
        Command::Rollout(a) => a.plan.common.output,
        Command::Rollback(a) => a.common.output,
        Command::Resume(a) | Command::Recover(a) => a.common.output,
        Command::Unlock(a) => a.common.output,
        Command::SwitchBack(a) => a.common.output,
        Command::Promote(a) | Command::Abort(a) => a.common.output,
        Command::Check(a) => a.common.output,
        Command::Status(a) => a.common.output,
        Command::History(a) => a.common.output,
        Command::Completions { .. } => unreachable!("handled above"),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::INTERNAL);
        }
    };
    let result = match &cli.command {
        Command::Plan(args) => runtime.block_on(deploy::plan_command(args)),
        Command::Rollout(args) => runtime.block_on(deploy::rollout_command(args)),
        Command::Rollback(args) => runtime.block_on(deploy::rollback_command(args)),
        Command::Resume(args) => runtime.block_on(deploy::resume_command(args, false)),
        Command::Recover(args) => runtime.block_on(deploy::resume_command(args, true)),
        Command::Unlock(args) => runtime.block_on(lock_host::unlock(args)),
        Command::SwitchBack(args) => runtime.block_on(deploy::switch_back_command(args)),
        Command::Promote(args) => runtime.block_on(lock_host::decide(args, Decision::Promote)),
        Command::Abort(args) => runtime.block_on(lock_host::decide(args, Decision::Abort)),
        Command::Check(args) => runtime.block_on(inspect::check(args)),
        Command::Status(args) => runtime.block_on(inspect::status(args)),
        Command::History(args) => runtime.block_on(inspect::history(args)),
        Command::Completions { .. } => unreachable!("handled above"),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            report_error(&error, output);
            ExitCode::from(exit_code(&error))
        }
    }
}

fn exit_code(error: &Error) -> u8 {
    match error {
        Error::InventoryRead { .. }
        | Error::Inventory { .. }
        | Error::Usage { .. }
        | Error::SshConfig { .. }
        | Error::Artifact { .. }
        | Error::Discovery(_) => exit::BAD_INPUT,
        Error::Preflight { .. }
        | Error::Sudo { .. }
        | Error::DiscoveryFailed(_)
        | Error::Unfinished(_)
        | Error::State(_)
        | Error::SwitchBackRefused { .. }
        | Error::Hook { .. } => exit::PREFLIGHT,
        Error::Locked(_) => exit::LOCKED,
        Error::Interrupted { .. } => exit::INTERRUPTED,
    }
}

fn outcome_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Succeeded => exit::OK,
        Outcome::RolledBack => exit::ROLLED_BACK,
        Outcome::RollbackIncomplete => exit::ROLLBACK_INCOMPLETE,
        Outcome::Halted => exit::HALTED,
        Outcome::Interrupted => exit::INTERRUPTED,
    }
}

fn report_error(error: &Error, output: Output) {
    if output == Output::Json {
        let detail = match error {
            Error::Inventory { file, problems } => {
                serde_json::json!({ "kind": "inventory", "file": file, "problems": problems })
            }
            Error::Preflight { failures } => {
                serde_json::json!({ "kind": "preflight", "failures": failures })
            }
            Error::Sudo { refusals } => {
                serde_json::json!({ "kind": "sudo", "refusals": refusals })
            }
            Error::InventoryRead { file, .. } => {
                serde_json::json!({ "kind": "inventory", "file": file })
            }
            Error::Usage { flag, .. } => serde_json::json!({ "kind": "usage", "flag": flag }),
            Error::SshConfig { file, .. } => {
                serde_json::json!({ "kind": "ssh-config", "file": file })
            }
            Error::Artifact { path, .. } => serde_json::json!({ "kind": "artifact", "path": path }),
            Error::Locked(_) => serde_json::json!({ "kind": "locked" }),
            Error::Interrupted { reason } => {
                serde_json::json!({ "kind": "interrupted", "reason": reason })
            }
            Error::Unfinished(_) => serde_json::json!({ "kind": "unfinished" }),
            Error::State(_) => serde_json::json!({ "kind": "state" }),
            Error::Discovery(_) => serde_json::json!({ "kind": "discovery" }),
            Error::DiscoveryFailed(_) => serde_json::json!({ "kind": "discovery-failed" }),
            Error::SwitchBackRefused { slot, live, hosts } => serde_json::json!({
                "kind": "switch-back-refused", "slot": slot.as_str(), "live": live.as_str(), "hosts": hosts
            }),
            Error::Hook { hook, .. } => serde_json::json!({ "kind": "hook", "hook": hook }),
        };
        println!(
            "{}",
            json_event(
                "error",
                serde_json::json!({ "message": error.to_string(), "error": detail })
            )
        );
    }
    eprintln!("error: {error}");
}

/// The inventory with its hosts: those it lists, or those its discovery finds now. Commands
/// that act on a recorded rollout take its hosts from the state instead, and those that need
/// only the lock host load the inventory alone.
async fn load_inventory(common: &Common) -> Result<Inventory, Error> {
    let mut inventory = Inventory::load(&common.inventory)?;
    if let Some(discovery) = &inventory.discovery {
        let found = discovery.find().await?;
        inventory.hosts = discovery::into_hosts(&found, discovery.user());
        if common.output == Output::Text && !quiet() {
            eprintln!(
                "found {} hosts ({}): {}",
                inventory.hosts.len(),
                discovery.describe(),
                shown_hosts(&inventory.hosts)
            );
        }
    }
    inventory.apply_host_names()?;
    Ok(inventory)
}

fn shown_hosts(hosts: &[roller::inventory::Host]) -> String {
    hosts
        .iter()
        .map(|h| format!("{} ({})", h.name, h.address))
        .collect::<Vec<_>>()
        .join(", ")
}
