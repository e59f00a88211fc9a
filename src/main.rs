//! The `roller` command line: parses flags, wires the library together, and is the only place
//! where outcomes become exit codes.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

mod inspect;
mod lock_host;

use roller::commands::canary_decision::Decision;
use roller::commands::plan::PlanRequest;
use roller::commands::resume::ResumeRequest;
use roller::commands::rollback::RollbackRequest;
use roller::commands::rollout::RolloutRequest;
use roller::commands::switch_back::SwitchBackRequest;
use roller::commands::{self, Finished};
use roller::discovery;
use roller::error::Error;
use roller::executor::FailurePolicy;
use roller::inventory::{Inventory, Strategy};
use roller::plan::{BatchSize, Summary};
use roller::report::{
    JsonReporter, Outcome, PlainReporter, ProgressReporter, QuietReporter, Reporter, json_event,
};
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
    #[arg(long, short = 'q', global = true)]
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
    Plan(PlanCommandArgs),
    /// Perform a rollout.
    #[command(
        after_help = "Examples:\n  roller rollout -i roller.toml -a shop-2.4.0.jar --batch 1\n  roller rollout -i roller.toml -a shop.jar --batch 25% --lock-wait 10m --output json --quiet"
    )]
    Rollout(RolloutArgs),
    /// Roll back to the release before the live one (or --to one), already on the hosts: no upload.
    #[command(
        after_help = "Examples:\n  roller rollback -i roller.toml --batch 1\n  roller rollback -i roller.toml --to shop-2.3.9-1a2b3c4d5e6f --output json"
    )]
    Rollback(RollbackArgs),
    /// Finish a rollout that was interrupted, halted, or whose controller died.
    #[command(after_help = "Example:\n  roller resume -i roller.toml")]
    Resume(ResumeArgs),
    /// Put every host back on its release from before an unfinished rollout, and in the pool.
    #[command(after_help = "Example:\n  roller recover -i roller.toml")]
    Recover(ResumeArgs),
    /// Remove the deploy lock, whoever holds it.
    #[command(
        after_help = "Example (only when `roller status` shows no live holder):\n  roller unlock -i roller.toml"
    )]
    Unlock(lock_host::UnlockArgs),
    /// Blue-green: send traffic back to the other slot (one reload, no restart).
    #[command(after_help = "Example:\n  roller switch-back -i roller.toml")]
    SwitchBack(SwitchBackArgs),
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

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    select: Select,
    /// The jar to roll out. `plan` accepts its absence when --release is given.
    #[arg(long, short = 'a')]
    artifact: Option<PathBuf>,
    /// Release name; defaults to the jar's file name and the start of its SHA-256.
    #[arg(long, short = 'r')]
    release: Option<String>,
    /// Hosts per batch: a count (1) or a share of the fleet (25%).
    #[arg(long, short = 'b', default_value = "1")]
    batch: BatchSize,
    /// rolling, blue-green or canary [default: the inventory's `strategy`, else rolling].
    #[arg(long)]
    strategy: Option<Strategy>,
    /// What to do when a batch fails.
    #[arg(long, value_enum, default_value_t = Policy::RollbackBatch)]
    on_failure: Policy,
    /// Hosts that may fail, each rolled back alone, before a batch fails as a whole.
    #[arg(long, default_value_t = 0)]
    max_failed_hosts: usize,
    /// Canary: after the last hold, wait for `roller promote` or `roller abort`.
    #[arg(long)]
    pause: bool,
}

#[derive(Args)]
struct PlanCommandArgs {
    #[command(flatten)]
    plan: PlanArgs,
    /// Plan `roller rollback --to RELEASE` instead: no stage, `current` back to RELEASE.
    #[arg(long, value_name = "RELEASE", conflicts_with_all = ["artifact", "release"])]
    rollback_to: Option<String>,
    /// Also print every remote command exactly as it will run, and the upstream file each
    /// load balancer gets at each pool change (text output).
    #[arg(long, short = 'v')]
    commands: bool,
}

#[derive(Args)]
struct Control {
    /// Wait this long for another rollout's deploy lock instead of failing at once ("10m").
    #[arg(long, value_parser = humantime::parse_duration)]
    lock_wait: Option<Duration>,
    /// Where the local journal is written [default: $XDG_STATE_HOME/roller or ~/.local/state/roller].
    #[arg(long)]
    journal_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RolloutArgs {
    #[command(flatten)]
    plan: PlanArgs,
    #[command(flatten)]
    control: Control,
}

#[derive(Args)]
struct RollbackArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    select: Select,
    /// Go back to this release, which every host must hold [default: the release before the
    /// live one, as each host recorded it in .roller/previous].
    #[arg(long, value_name = "RELEASE")]
    to: Option<String>,
    /// Hosts per batch: a count (1) or a share of the fleet (25%).
    #[arg(long, short = 'b', default_value = "1")]
    batch: BatchSize,
    #[command(flatten)]
    control: Control,
    /// What to do when a batch fails.
    #[arg(long, value_enum, default_value_t = Policy::RollbackBatch)]
    on_failure: Policy,
    /// Hosts that may fail, each rolled back alone, before a batch fails as a whole.
    #[arg(long, default_value_t = 0)]
    max_failed_hosts: usize,
}

#[derive(Args)]
struct ResumeArgs {
    #[command(flatten)]
    common: Common,
    /// Refused: resume and recover act on the hosts their rollout recorded.
    #[command(flatten)]
    select: Select,
    #[command(flatten)]
    control: Control,
    /// Read the rollout's state from this local journal instead of the load balancer.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// The jar, when it is no longer where the interrupted rollout read it.
    #[arg(long, short = 'a')]
    artifact: Option<PathBuf>,
}

#[derive(Args)]
struct SwitchBackArgs {
    #[command(flatten)]
    common: Common,
    /// Refused: a switch-back moves every host's traffic at once.
    #[command(flatten)]
    select: Select,
    #[command(flatten)]
    control: Control,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Policy {
    RollbackBatch,
    RollbackAll,
    Halt,
}

impl From<Policy> for FailurePolicy {
    fn from(p: Policy) -> FailurePolicy {
        match p {
            Policy::RollbackBatch => FailurePolicy::RollbackBatch,
            Policy::RollbackAll => FailurePolicy::RollbackAll,
            Policy::Halt => FailurePolicy::Halt,
        }
    }
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
        Command::Plan(args) => runtime.block_on(plan_command(args)),
        Command::Rollout(args) => runtime.block_on(rollout_command(args)),
        Command::Rollback(args) => runtime.block_on(rollback_command(args)),
        Command::Resume(args) => runtime.block_on(resume_command(args, false)),
        Command::Recover(args) => runtime.block_on(resume_command(args, true)),
        Command::Unlock(args) => runtime.block_on(lock_host::unlock(args)),
        Command::SwitchBack(args) => runtime.block_on(switch_back_command(args)),
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

impl Control {
    fn to_lib(&self) -> commands::Control {
        commands::Control {
            lock_wait: self.lock_wait,
            journal_dir: self.journal_dir.clone(),
        }
    }
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

async fn plan_command(command: &PlanCommandArgs) -> Result<u8, Error> {
    let args = &command.plan;
    let planned = commands::plan::plan(PlanRequest {
        inventory: load_inventory(&args.common).await?,
        artifact: args.artifact.clone(),
        release: args.release.clone(),
        batch: args.batch,
        strategy: args.strategy,
        selection: args.select.to_lib(),
        rollback_to: command.rollback_to.clone(),
        pause: args.pause,
    })?;
    // Written as it is made: a large plan's commands run to many times the plan's own size.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = match args.common.output {
        Output::Text => Summary {
            plan: &planned.plan,
            on_failure: args.on_failure.into(),
            max_failed_hosts: args.max_failed_hosts,
        }
        .write(&mut out)
        .and_then(|()| match command.commands {
            true => planned.plan.write_commands(&planned.balancer, &mut out),
            false => Ok(()),
        }),
        Output::Json => serde_json::to_writer_pretty(&mut out, &planned.plan)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out)),
    };
    match written.and_then(|()| out.flush()) {
        Ok(()) => Ok(exit::OK),
        // A reader that stopped early (`roller plan | head`) is not an error worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(exit::OK),
        Err(e) => {
            eprintln!("error: cannot write the plan: {e}");
            Ok(exit::INTERNAL)
        }
    }
}

async fn rollout_command(args: &RolloutArgs) -> Result<u8, Error> {
    let common = &args.plan.common;
    let request = RolloutRequest {
        inventory: load_inventory(common).await?,
        inventory_path: common.inventory.clone(),
        artifact: args.plan.artifact.clone(),
        release: args.plan.release.clone(),
        batch: args.plan.batch,
        strategy: args.plan.strategy,
        on_failure: args.plan.on_failure.into(),
        max_failed_hosts: args.plan.max_failed_hosts,
        pause: args.plan.pause,
        control: args.control.to_lib(),
        selection: args.plan.select.to_lib(),
    };
    let display = display(common.output);
    finished(
        commands::rollout::run(request, &display).await?,
        common.output,
    )
}

async fn rollback_command(args: &RollbackArgs) -> Result<u8, Error> {
    let request = RollbackRequest {
        inventory: load_inventory(&args.common).await?,
        inventory_path: args.common.inventory.clone(),
        to: args.to.clone(),
        batch: args.batch,
        on_failure: args.on_failure.into(),
        max_failed_hosts: args.max_failed_hosts,
        control: args.control.to_lib(),
        selection: args.select.to_lib(),
    };
    let display = display(args.common.output);
    finished(
        commands::rollback::run(request, &display).await?,
        args.common.output,
    )
}

async fn resume_command(args: &ResumeArgs, recover: bool) -> Result<u8, Error> {
    args.select.to_lib().refuse(
        if recover { "recover" } else { "resume" },
        "it acts on the hosts its rollout recorded (a rollout started with --hosts or --tag records its selection)",
    )?;
    let request = ResumeRequest {
        inventory: Inventory::load(&args.common.inventory)?,
        inventory_path: args.common.inventory.clone(),
        control: args.control.to_lib(),
        journal: args.journal.clone(),
        artifact: args.artifact.clone(),
        recover,
    };
    let display = display(args.common.output);
    finished(
        commands::resume::run(request, &display).await?,
        args.common.output,
    )
}

async fn switch_back_command(args: &SwitchBackArgs) -> Result<u8, Error> {
    args.select
        .to_lib()
        .refuse("switch-back", "it moves every host's traffic at once")?;
    let request = SwitchBackRequest {
        inventory: load_inventory(&args.common).await?,
        inventory_path: args.common.inventory.clone(),
        control: args.control.to_lib(),
    };
    let display = display(args.common.output);
    finished(
        commands::switch_back::run(request, &display).await?,
        args.common.output,
    )
}

/// How a run is shown: JSON events, a line per host on a terminal, or plain log lines.
fn display(output: Output) -> impl Fn(&Inventory) -> Arc<dyn Reporter> {
    move |inventory: &Inventory| -> Arc<dyn Reporter> {
        match output {
            Output::Json => Arc::new(JsonReporter { quiet: quiet() }),
            Output::Text if quiet() => Arc::new(QuietReporter),
            Output::Text if std::io::stderr().is_terminal() => {
                let mut targets: Vec<String> =
                    inventory.hosts.iter().map(|h| h.name.clone()).collect();
                targets.extend(inventory.balancer.hosts.iter().cloned());
                Arc::new(ProgressReporter::new(&targets))
            }
            Output::Text => Arc::new(PlainReporter),
        }
    }
}

/// The report of a run that reached the executor, and its exit code.
fn finished(finished: Finished, output: Output) -> Result<u8, Error> {
    let succeeded = finished.report.outcome == Outcome::Succeeded;
    if output == Output::Text && !(quiet() && succeeded) {
        print!("{}", finished.report.render_text());
        eprintln!("journal: {}", finished.journal.display());
    }
    Ok(outcome_code(finished.report.outcome))
}
