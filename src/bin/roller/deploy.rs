//! The flags and wiring of `plan` and of the commands that change the fleet (`rollout`,
//! `rollback`, `resume`, `recover`, `switch-back`), and how their runs are shown.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use roller::commands::plan::PlanRequest;
use roller::commands::resume::ResumeRequest;
use roller::commands::rollback::RollbackRequest;
use roller::commands::rollout::RolloutRequest;
use roller::commands::switch_back::SwitchBackRequest;
use roller::commands::{self, Finished};
use roller::error::Error;
use roller::executor::FailurePolicy;
use roller::inventory::{Inventory, Strategy};
use roller::plan::{BatchSize, Summary};
use roller::report::{
    JsonReporter, Outcome, PlainReporter, ProgressReporter, QuietReporter, Reporter,
};

use crate::{Common, Output, Select, exit, load_inventory, outcome_code, quiet};

#[derive(Args)]
pub(crate) struct PlanArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(flatten)]
    pub(crate) select: Select,
    /// The jar to roll out. `plan` accepts its absence when --release is given.
    #[arg(long, short = 'a')]
    pub(crate) artifact: Option<PathBuf>,
    /// Release name; defaults to the jar's file name and the start of its SHA-256.
    #[arg(long, short = 'r')]
    pub(crate) release: Option<String>,
    /// Hosts per batch: a count (1) or a share of the fleet (25%).
    #[arg(long, short = 'b', default_value = "1")]
    pub(crate) batch: BatchSize,
    /// rolling, blue-green or canary [default: the inventory's `strategy`, else rolling].
    #[arg(long)]
    pub(crate) strategy: Option<Strategy>,
    #[command(flatten)]
    pub(crate) failure: OnFailure,
    /// Canary: after the last hold, wait for `roller promote` or `roller abort`.
    #[arg(long)]
    pub(crate) pause: bool,
}

/// What a rollout or a rollback does when hosts fail.
#[derive(Args)]
pub(crate) struct OnFailure {
    /// What to do when a batch fails.
    #[arg(long, value_enum, default_value_t = Policy::RollbackBatch)]
    pub(crate) on_failure: Policy,
    /// Hosts that may fail, each rolled back alone, before a batch fails as a whole.
    #[arg(long, default_value_t = 0)]
    pub(crate) max_failed_hosts: usize,
}

#[derive(Args)]
pub(crate) struct PlanCommandArgs {
    #[command(flatten)]
    pub(crate) plan: PlanArgs,
    /// Plan `roller rollback --to RELEASE` instead: no stage, `current` back to RELEASE.
    #[arg(long, value_name = "RELEASE", conflicts_with_all = ["artifact", "release"])]
    pub(crate) rollback_to: Option<String>,
    /// Also print every remote command exactly as it will run, and the upstream file each
    /// load balancer gets at each pool change (text output).
    #[arg(long, short = 'v')]
    pub(crate) commands: bool,
}

#[derive(Args)]
pub(crate) struct Control {
    /// Wait this long for another rollout's deploy lock instead of failing at once ("10m").
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) lock_wait: Option<Duration>,
    /// Where the local journal is written [default: $XDG_STATE_HOME/roller or ~/.local/state/roller].
    #[arg(long)]
    pub(crate) journal_dir: Option<PathBuf>,
}

impl Control {
    fn to_lib(&self) -> commands::Control {
        commands::Control {
            lock_wait: self.lock_wait,
            journal_dir: self.journal_dir.clone(),
        }
    }
}

#[derive(Args)]
pub(crate) struct RolloutArgs {
    #[command(flatten)]
    pub(crate) plan: PlanArgs,
    #[command(flatten)]
    pub(crate) control: Control,
}

#[derive(Args)]
pub(crate) struct RollbackArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(flatten)]
    pub(crate) select: Select,
    /// Go back to this release, which every host must hold [default: the release before the
    /// live one, as each host recorded it in .roller/previous].
    #[arg(long, value_name = "RELEASE")]
    pub(crate) to: Option<String>,
    /// Hosts per batch: a count (1) or a share of the fleet (25%).
    #[arg(long, short = 'b', default_value = "1")]
    pub(crate) batch: BatchSize,
    #[command(flatten)]
    pub(crate) control: Control,
    #[command(flatten)]
    pub(crate) failure: OnFailure,
}

#[derive(Args)]
pub(crate) struct ResumeArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Refused: resume and recover act on the hosts their rollout recorded.
    #[command(flatten)]
    pub(crate) select: Select,
    #[command(flatten)]
    pub(crate) control: Control,
    /// Read the rollout's state from this local journal instead of the load balancer.
    #[arg(long)]
    pub(crate) journal: Option<PathBuf>,
    /// The jar, when it is no longer where the interrupted rollout read it.
    #[arg(long, short = 'a')]
    pub(crate) artifact: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct SwitchBackArgs {
    #[command(flatten)]
    pub(crate) common: Common,
    /// Refused: a switch-back moves every host's traffic at once.
    #[command(flatten)]
    pub(crate) select: Select,
    #[command(flatten)]
    pub(crate) control: Control,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Policy {
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

pub(crate) async fn plan_command(command: &PlanCommandArgs) -> Result<u8, Error> {
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
            on_failure: args.failure.on_failure.into(),
            max_failed_hosts: args.failure.max_failed_hosts,
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

pub(crate) async fn rollout_command(args: &RolloutArgs) -> Result<u8, Error> {
    let common = &args.plan.common;
    let request = RolloutRequest {
        inventory: load_inventory(common).await?,
        inventory_path: common.inventory.clone(),
        artifact: args.plan.artifact.clone(),
        release: args.plan.release.clone(),
        batch: args.plan.batch,
        strategy: args.plan.strategy,
        on_failure: args.plan.failure.on_failure.into(),
        max_failed_hosts: args.plan.failure.max_failed_hosts,
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

pub(crate) async fn rollback_command(args: &RollbackArgs) -> Result<u8, Error> {
    let request = RollbackRequest {
        inventory: load_inventory(&args.common).await?,
        inventory_path: args.common.inventory.clone(),
        to: args.to.clone(),
        batch: args.batch,
        on_failure: args.failure.on_failure.into(),
        max_failed_hosts: args.failure.max_failed_hosts,
        control: args.control.to_lib(),
        selection: args.select.to_lib(),
    };
    let display = display(args.common.output);
    finished(
        commands::rollback::run(request, &display).await?,
        args.common.output,
    )
}

pub(crate) async fn resume_command(args: &ResumeArgs, recover: bool) -> Result<u8, Error> {
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

pub(crate) async fn switch_back_command(args: &SwitchBackArgs) -> Result<u8, Error> {
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
