//! The `roller` command line: parses flags, wires the library together, and is the only place
//! where outcomes become exit codes.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use roller::balancer::Nginx;
use roller::discovery::{self, FoundHost};
use roller::error::{Error, HostFailure};
use roller::executor::{
    self, Executor, ExecutorInput, FailurePolicy, JournalAndLockHost, KeptState, Options,
    StateStore,
};
use roller::health::HttpOverSsh;
use roller::inventory::{Inventory, Strategy};
use roller::journal::{self, Journal, Progress, RolloutState, Status, Tee};
use roller::lock::{self, Acquired, LeaseKeeper, LockError, LockInfo, LockSpec};
use roller::plan::{Artifact, BatchSize, Plan, PlanInput};
use roller::report::{
    JsonReporter, Outcome, PlainReporter, ProgressReporter, Reporter, RolloutReport,
};
use roller::transport::Transport;
use roller::transport::ssh::{SshConnector, SshSettings};

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
}

#[derive(Subcommand)]
enum Command {
    /// Print what a rollout would do, offline: no network, no SSH.
    Plan(PlanArgs),
    /// Perform a rollout.
    Rollout(RolloutArgs),
    /// Finish a rollout that was interrupted, halted, or whose controller died.
    Resume(ResumeArgs),
    /// Put every host back on its release from before an unfinished rollout, and in the pool.
    Recover(ResumeArgs),
    /// Remove the deploy lock, whoever holds it.
    Unlock(UnlockArgs),
    /// Blue-green: send traffic back to the other slot (one reload, no restart).
    SwitchBack(SwitchBackArgs),
    /// Canary with --pause: let the paused rollout go on to the rest of the fleet.
    Promote(UnlockArgs),
    /// Canary with --pause: roll the canary back and stop.
    Abort(UnlockArgs),
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

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    common: Common,
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
struct ResumeArgs {
    #[command(flatten)]
    common: Common,
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
struct UnlockArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct SwitchBackArgs {
    #[command(flatten)]
    common: Common,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ROLLER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let output = match &cli.command {
        Command::Plan(a) => a.common.output,
        Command::Rollout(a) => a.plan.common.output,
        Command::Resume(a) | Command::Recover(a) => a.common.output,
        Command::Unlock(a) => a.common.output,
        Command::SwitchBack(a) => a.common.output,
        Command::Promote(a) | Command::Abort(a) => a.common.output,
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
        Command::Resume(args) => runtime.block_on(resume_command(args, false)),
        Command::Recover(args) => runtime.block_on(resume_command(args, true)),
        Command::Unlock(args) => runtime.block_on(unlock_command(args)),
        Command::SwitchBack(args) => runtime.block_on(switch_back_command(args)),
        Command::Promote(args) => runtime.block_on(decide(args, "promote")),
        Command::Abort(args) => runtime.block_on(decide(args, "abort")),
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
        | Error::Artifact { .. }
        | Error::Discovery(_) => exit::BAD_INPUT,
        Error::Preflight { .. }
        | Error::DiscoveryFailed(_)
        | Error::Unfinished(_)
        | Error::State(_)
        | Error::SwitchBackRefused { .. } => exit::PREFLIGHT,
        Error::Locked(_) => exit::LOCKED,
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
            Error::InventoryRead { file, .. } => {
                serde_json::json!({ "kind": "inventory", "file": file })
            }
            Error::Usage { flag, .. } => serde_json::json!({ "kind": "usage", "flag": flag }),
            Error::Artifact { path, .. } => serde_json::json!({ "kind": "artifact", "path": path }),
            Error::Locked(_) => serde_json::json!({ "kind": "locked" }),
            Error::Unfinished(_) => serde_json::json!({ "kind": "unfinished" }),
            Error::State(_) => serde_json::json!({ "kind": "state" }),
            Error::Discovery(_) => serde_json::json!({ "kind": "discovery" }),
            Error::DiscoveryFailed(_) => serde_json::json!({ "kind": "discovery-failed" }),
            Error::SwitchBackRefused { slot, live, hosts } => serde_json::json!({
                "kind": "switch-back-refused", "slot": slot, "live": live, "hosts": hosts
            }),
        };
        println!(
            "{}",
            serde_json::json!({ "event": "error", "message": error.to_string(), "error": detail })
        );
    }
    eprintln!("error: {error}");
}

/// The inventory with its hosts: those it lists, or those its discovery finds now. Commands
/// that act on a recorded rollout take its hosts from the state instead ([`recorded_hosts`]).
async fn load_inventory(common: &Common) -> Result<(Inventory, Nginx), Error> {
    let mut inventory = Inventory::load(&common.inventory)?;
    if let Some(discovery) = &inventory.discovery {
        let found = discovery.find().await?;
        inventory.hosts = discovery::into_hosts(&found, discovery.user());
        if common.output == Output::Text {
            eprintln!(
                "found {} hosts ({}): {}",
                inventory.hosts.len(),
                discovery.describe(),
                shown_hosts(&inventory.hosts)
            );
        }
    }
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    Ok((inventory, balancer))
}

/// The inventory alone, for commands that need only the lock host.
fn inventory_without_hosts(common: &Common) -> Result<Inventory, Error> {
    Inventory::load(&common.inventory)
}

/// A discovering inventory's hosts as `state` recorded them: a resume or recover acts on the
/// fleet the rollout found, even if the group scaled since.
fn recorded_hosts(inventory: &mut Inventory, state: &RolloutState) -> Result<(), Error> {
    let Some(discovery) = &inventory.discovery else {
        return Ok(());
    };
    if state.found.is_empty() {
        return Err(Error::State(format!(
            "rollout {} records no hosts, but the inventory finds its hosts through [discovery]: it was started with [[hosts]]; list them again to finish it",
            state.id
        )));
    }
    inventory.hosts = discovery::into_hosts(&state.found, discovery.user());
    Ok(())
}

fn shown_hosts(hosts: &[roller::inventory::Host]) -> String {
    hosts
        .iter()
        .map(|h| format!("{} ({})", h.name, h.address))
        .collect::<Vec<_>>()
        .join(", ")
}

fn release_for(release: &Option<String>, artifact: &Option<Artifact>) -> Result<String, Error> {
    match (release, artifact) {
        (Some(r), _) => Ok(r.clone()),
        (None, Some(a)) => Ok(a.default_release()),
        (None, None) => Err(Error::Usage {
            flag: "--release".into(),
            message: "give --artifact, --release, or both".into(),
        }),
    }
}

async fn plan_command(args: &PlanArgs) -> Result<u8, Error> {
    let (mut inventory, balancer) = load_inventory(&args.common).await?;
    inventory.strategy = args.strategy.unwrap_or(inventory.strategy);
    let artifact = args.artifact.as_deref().map(Artifact::load).transpose()?;
    let plan = Plan::build(PlanInput {
        inventory: &inventory,
        balancer: &balancer,
        release: release_for(&args.release, &artifact)?,
        artifact,
        batch: args.batch,
        observed: None,
        unfinished: &BTreeSet::new(),
        targets: None,
        strategy: inventory.strategy,
        live_slot: None,
        pause: false,
        adopt: false,
    })?;
    match args.common.output {
        Output::Text => print!("{}", plan.render_text()),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("a plan always serializes")
        ),
    }
    Ok(exit::OK)
}

/// What a rollout, a resumed rollout and a recovery have in common.
struct Job {
    pause: bool,
    inventory: Inventory,
    inventory_path: PathBuf,
    balancer: Nginx,
    output: Output,
    release: String,
    artifact: Option<Artifact>,
    batch: BatchSize,
    options: Options,
    lock_wait: Option<Duration>,
    journal_dir: PathBuf,
    kind: JobKind,
}

enum JobKind {
    Rollout,
    /// Finishes the rollout in this state.
    Resume(RolloutState),
    /// Returns every host to its release from before the rollout in this state.
    Recover(RolloutState),
    /// Blue-green: traffic back to the other slot.
    SwitchBack,
}

async fn rollout_command(args: &RolloutArgs) -> Result<u8, Error> {
    let (mut inventory, balancer) = load_inventory(&args.plan.common).await?;
    inventory.strategy = args.plan.strategy.unwrap_or(inventory.strategy);
    if inventory.strategy == Strategy::BlueGreen && inventory.blue_green.is_none() {
        return Err(Error::Usage {
            flag: "--strategy".into(),
            message: format!(
                "blue-green needs a [blue_green] section in {}",
                args.plan.common.inventory.display()
            ),
        });
    }
    let Some(path) = &args.plan.artifact else {
        return Err(Error::Usage {
            flag: "--artifact".into(),
            message: "a rollout needs the jar to upload".into(),
        });
    };
    let artifact = Artifact::load(path)?;
    let release = release_for(&args.plan.release, &Some(artifact.clone()))?;
    let job = Job {
        pause: args.pause,
        options: options(
            &args.plan.common,
            args.on_failure.into(),
            args.max_failed_hosts,
        ),
        inventory_path: args.plan.common.inventory.clone(),
        inventory,
        balancer,
        output: args.plan.common.output,
        release,
        artifact: Some(artifact),
        batch: args.plan.batch,
        lock_wait: args.control.lock_wait,
        journal_dir: journal_dir(&args.control),
        kind: JobKind::Rollout,
    };
    drive(job).await
}

async fn resume_command(args: &ResumeArgs, recover: bool) -> Result<u8, Error> {
    let mut inventory = inventory_without_hosts(&args.common)?;
    let state = match &args.journal {
        Some(path) => {
            let state = Journal::last_state(path)
                .map_err(|e| Error::State(format!("cannot read journal {}: {e}", path.display())))?
                .ok_or_else(|| {
                    Error::Unfinished(format!("journal {} holds no rollout state", path.display()))
                })?;
            trusted(state, &inventory, &path.display().to_string())?
        }
        None => read_remote_state(&inventory).await?.ok_or_else(|| {
            Error::Unfinished(format!(
                "no rollout of {} is recorded on {}: nothing to {}",
                inventory.app.name,
                inventory.balancer.lock_host,
                if recover { "recover" } else { "resume" }
            ))
        })?,
    };
    if !state.status.unfinished() {
        return Err(Error::Unfinished(format!(
            "rollout {} of {} already ended ({:?}): nothing to {}",
            state.id,
            state.release,
            state.status,
            if recover { "recover" } else { "resume" }
        )));
    }
    // Never a path from the recorded state: whoever can write that file could make us upload
    // any local file. Without --artifact, every host must already hold the recorded jar.
    let artifact = match (&args.artifact, recover) {
        (_, true) => None,
        (Some(path), false) => {
            let artifact = Artifact::load(path)?;
            if state
                .artifact_sha256
                .as_ref()
                .is_some_and(|sha| sha != &artifact.sha256)
            {
                return Err(Error::Artifact {
                    path: path.clone(),
                    message: format!(
                        "is not the jar of release {} (its sha256 differs from the one recorded)",
                        state.release
                    ),
                });
            }
            Some(artifact)
        }
        (None, false) if state.artifact_sha256.is_none() => {
            return Err(Error::Usage {
                flag: "--artifact".into(),
                message: format!(
                    "rollout {} records no checksum for release {}: give its jar with --artifact",
                    state.id, state.release
                ),
            });
        }
        (None, false) => None,
    };
    recorded_hosts(&mut inventory, &state)?;
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    inventory.strategy = state.strategy;
    let on_failure = state.on_failure;
    let batch = state.batch;
    let job = Job {
        pause: false,
        options: options(&args.common, on_failure, state.max_failed_hosts),
        inventory_path: args.common.inventory.clone(),
        inventory,
        balancer,
        output: args.common.output,
        release: state.release.clone(),
        artifact,
        batch,
        lock_wait: args.control.lock_wait,
        journal_dir: journal_dir(&args.control),
        kind: if recover {
            JobKind::Recover(state)
        } else {
            JobKind::Resume(state)
        },
    };
    drive(job).await
}

async fn switch_back_command(args: &SwitchBackArgs) -> Result<u8, Error> {
    let (mut inventory, balancer) = load_inventory(&args.common).await?;
    if inventory.blue_green.is_none() {
        return Err(Error::Usage {
            flag: "switch-back".into(),
            message: format!(
                "needs a [blue_green] section in {}",
                args.common.inventory.display()
            ),
        });
    }
    inventory.strategy = Strategy::BlueGreen;
    let job = Job {
        pause: false,
        options: options(&args.common, FailurePolicy::RollbackBatch, 0),
        inventory_path: args.common.inventory.clone(),
        inventory,
        balancer,
        output: args.common.output,
        release: "switch-back".into(),
        artifact: None,
        batch: BatchSize::Hosts(1),
        lock_wait: args.control.lock_wait,
        journal_dir: journal_dir(&args.control),
        kind: JobKind::SwitchBack,
    };
    drive(job).await
}

/// Leaves word for a paused canary rollout on the first load balancer, naming the rollout so
/// that a stale word never applies to the next one.
async fn decide(args: &UnlockArgs, decision: &str) -> Result<u8, Error> {
    let inventory = inventory_without_hosts(&args.common)?;
    let lb = connect_lock_host(&inventory).await?;
    let result = async {
        let state = read_state(lb.as_ref(), &inventory)
            .await?
            .filter(|s| s.status == Status::Running)
            .ok_or_else(|| {
                Error::Unfinished(format!(
                    "no rollout of {} is running: nothing to {decision}",
                    inventory.app.name
                ))
            })?;
        let file = roller::plan::decision_file(&inventory);
        let command = format!(
            "umask 077; mkdir -p -m 700 {} && printf '%s\\n' {} > {}",
            roller::remote::quote(&inventory.balancer.state_dir),
            roller::remote::quote(&format!("{decision} {}", state.id)),
            roller::remote::quote(&file)
        );
        let out = lb
            .exec(&command, None, Duration::from_secs(30))
            .await
            .map_err(|e| Error::State(e.to_string()))?;
        if !out.success() {
            return Err(Error::State(format!(
                "cannot write {file}: {}",
                out.stderr_text()
            )));
        }
        Ok(state)
    }
    .await;
    lb.close().await;
    let state = result?;
    match args.common.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({ "event": decision, "rollout": state.id, "release": state.release })
        ),
        Output::Text => println!(
            "told rollout {} of {} to {decision}",
            state.id, state.release
        ),
    }
    Ok(exit::OK)
}

async fn unlock_command(args: &UnlockArgs) -> Result<u8, Error> {
    let inventory = inventory_without_hosts(&args.common)?;
    let lb = connect_lock_host(&inventory).await?;
    let removed = lock::unlock(lb.as_ref(), &lock_spec(&inventory))
        .await
        .map_err(|e| Error::State(e.to_string()));
    lb.close().await;
    let removed = removed?;
    record_lock_event(
        &journal::Journal::default_dir(),
        &inventory.app.name,
        "unlock",
        serde_json::json!({ "removed": removed }),
    );
    match (&removed, args.common.output) {
        (_, Output::Json) => println!(
            "{}",
            serde_json::json!({ "event": "unlocked", "removed": removed })
        ),
        (Some(holder), Output::Text) => println!("removed the deploy lock held by {holder}"),
        (None, Output::Text) => println!("there was no deploy lock"),
    }
    Ok(exit::OK)
}

fn options(common: &Common, on_failure: FailurePolicy, max_failed_hosts: usize) -> Options {
    let inv = common.inventory.display();
    Options {
        on_failure,
        max_failed_hosts,
        resume_hint: format!("roller resume --inventory {inv}"),
        recover_hint: format!("roller recover --inventory {inv}"),
        rollout_id: String::new(),
    }
}

fn journal_dir(control: &Control) -> PathBuf {
    control
        .journal_dir
        .clone()
        .unwrap_or_else(Journal::default_dir)
}

/// The inventory's load balancers, sorted: what the lock and the rollout state record, so that
/// another inventory for the same app with another set is noticed.
fn balancer_set(inv: &Inventory) -> Vec<String> {
    let mut set = inv.balancer.hosts.clone();
    set.sort();
    set.dedup();
    set
}

fn lock_spec(inv: &Inventory) -> LockSpec {
    LockSpec {
        state_dir: inv.balancer.state_dir.clone(),
        app: inv.app.name.clone(),
        lease: inv.balancer.lock_lease,
    }
}

fn connector(inv: &Inventory) -> Result<SshConnector, Error> {
    SshConnector::new(SshSettings {
        user: inv.ssh.user.clone(),
        identity: inv.ssh.identity.clone(),
        identity_passphrase: None,
        known_hosts: inv.ssh.known_hosts.clone(),
        connect_timeout: inv.ssh.connect_timeout,
        max_channels_per_host: 8,
        max_concurrent_connects: 8,
        allow_sha1_rsa: inv.ssh.allow_sha1_rsa,
        proxy_jump: Vec::new(),
        proxy_command: None,
    })
    .map_err(|e| Error::Preflight {
        failures: vec![HostFailure {
            host: "(controller)".into(),
            step: "ssh setup".into(),
            message: e.to_string(),
        }],
    })
}

async fn connect_lock_host(inv: &Inventory) -> Result<Arc<dyn Transport>, Error> {
    use roller::transport::Connector;
    let connector = connector(inv)?;
    let endpoint = executor::endpoints(inv)
        .into_iter()
        .find(|e| e.name == inv.balancer.lock_host)
        .expect("the lock host is an endpoint");
    connector
        .connect(&endpoint)
        .await
        .map_err(|e| Error::Preflight {
            failures: vec![HostFailure {
                host: endpoint.name,
                step: "connect".into(),
                message: e.to_string(),
            }],
        })
}

async fn read_remote_state(inv: &Inventory) -> Result<Option<RolloutState>, Error> {
    let lb = connect_lock_host(inv).await?;
    let state = read_state(lb.as_ref(), inv).await;
    lb.close().await;
    state
}

async fn read_state(lb: &dyn Transport, inv: &Inventory) -> Result<Option<RolloutState>, Error> {
    let command = journal::read_state_command(&inv.balancer.state_dir, &inv.app.name);
    let out = lb
        .exec(&command, None, Duration::from_secs(30))
        .await
        .map_err(|e| Error::State(format!("cannot read the rollout state: {e}")))?;
    if !out.success() {
        return Err(Error::State(format!(
            "cannot read the rollout state: {}",
            out.stderr_text()
        )));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let file = format!(
        "{}:{}",
        inv.balancer.lock_host,
        journal::state_file(&inv.balancer.state_dir, &inv.app.name)
    );
    let state = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::State(format!("the rollout state {file} is unreadable: {e}")))?;
    trusted(state, inv, &file).map(Some)
}

/// The state if every value in it follows the rules roller writes it by; else an error naming
/// the file, before anything acts on it.
fn trusted(state: RolloutState, inv: &Inventory, file: &str) -> Result<RolloutState, Error> {
    let problems = state.problems(inv);
    if problems.is_empty() {
        return Ok(state);
    }
    Err(Error::State(format!(
        "refusing the rollout state {file}: it was not written by roller as it stands, nothing was done:\n{}\n\
         inspect the file, and put the fleet in order by hand if it was tampered with",
        problems
            .iter()
            .map(|p| format!("  - {p}"))
            .collect::<Vec<_>>()
            .join("\n")
    )))
}

/// Without a jar given, a resumed rollout relies on the one staged on every host: each must hold
/// it with the recorded checksum, or nothing starts.
async fn verify_staged_jar(
    inv: &Inventory,
    sessions: &executor::Sessions,
    release: &str,
    sha256: &str,
) -> Result<(), Error> {
    let command = roller::remote::artifact_present(&inv.app, release, sha256);
    let checks = futures::future::join_all(inv.hosts.iter().map(|h| {
        let command = command.clone();
        async move {
            let out = sessions[&h.name]
                .exec(&command, None, Duration::from_secs(60))
                .await;
            (h.name.clone(), out)
        }
    }))
    .await;
    let failures: Vec<HostFailure> = checks
        .into_iter()
        .filter_map(|(host, out)| {
            let message = match out {
                Ok(out) if out.success() && out.stdout_text() == "present" => return None,
                Ok(out) if out.success() => format!(
                    "{}/releases/{release}/{} is missing or not the recorded jar: give it with --artifact",
                    inv.app.dir, inv.app.jar_name
                ),
                Ok(out) => out.stderr_text(),
                Err(e) => e.to_string(),
            };
            Some(HostFailure {
                host,
                step: "staged jar".into(),
                message,
            })
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Preflight { failures })
    }
}

fn record_lock_event(dir: &std::path::Path, app: &str, kind: &str, body: serde_json::Value) {
    match Journal::create(dir, app, "locks") {
        Ok(j) => j.record(kind, body),
        Err(e) => tracing::warn!("cannot record {kind} in {}: {e}", dir.display()),
    }
}

/// Turns Ctrl-C and SIGTERM into an interrupt; a second one only warns, because stopping in
/// the middle of a rollback is what would strand hosts.
fn watch_signals(tx: watch::Sender<Option<String>>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
        let mut count = 0;
        loop {
            let name = tokio::select! {
                r = tokio::signal::ctrl_c() => { if r.is_err() { return; } "SIGINT" }
                _ = term.recv() => "SIGTERM",
            };
            count += 1;
            if count == 1 {
                eprintln!(
                    "roller: {name} received: finishing the step in progress, then returning every host to the pool"
                );
                let _ = tx.send(Some(format!("{name} received")));
            } else {
                eprintln!(
                    "roller: {name} again: still restoring the fleet, and stopping now would leave hosts out of the pool; roller exits as soon as it is done (kill -9 leaves a journal for `roller resume` or `roller recover`)"
                );
            }
        }
    });
}

async fn drive(job: Job) -> Result<u8, Error> {
    let (interrupt_tx, interrupt) = watch::channel(None);
    watch_signals(interrupt_tx.clone());
    let inv = &job.inventory;
    let connector: Arc<dyn roller::transport::Connector> = Arc::new(connector(inv)?);
    let sessions = executor::connect(inv, connector).await?;
    let lb = sessions[&inv.balancer.lock_host].clone();
    let result = locked(&job, &sessions, lb.clone(), interrupt, interrupt_tx).await;
    for session in sessions.values() {
        session.close().await;
    }
    result
}

/// Everything that happens while holding the deploy lock.
async fn locked(
    job: &Job,
    sessions: &executor::Sessions,
    lb: Arc<dyn Transport>,
    interrupt: executor::Interrupt,
    interrupt_tx: watch::Sender<Option<String>>,
) -> Result<u8, Error> {
    let inv = &job.inventory;
    let spec = lock_spec(inv);
    // The token is this process's alone: a resume or recover must never pass for the
    // controller it takes over from, or two could drive the fleet at once.
    let me = LockInfo {
        balancers: balancer_set(inv).join(","),
        ..LockInfo::new_for(&job.release)
    };
    let rollout_id = match &job.kind {
        JobKind::Resume(state) | JobKind::Recover(state) => state.id.clone(),
        JobKind::Rollout | JobKind::SwitchBack => lock::new_id(),
    };
    let acquired = match lock::acquire_sent(lb.as_ref(), &spec, &me, None).await {
        Err(LockError::Held { holder, .. }) if lock::holder_is_gone(&holder) => {
            let sent = tokio::time::Instant::now();
            lock::take_over_gone(lb.as_ref(), &spec, &me, &holder)
                .await
                .map(|(info, how)| (info, how, sent))
        }
        Err(LockError::Held { .. }) if job.lock_wait.is_some() => {
            lock::acquire_sent(lb.as_ref(), &spec, &me, job.lock_wait).await
        }
        other => other,
    };
    let (acquired, sent) = match acquired {
        Ok((_, acquired, sent)) => (acquired, sent),
        Err(e @ (LockError::Held { .. } | LockError::OtherBalancers { .. })) => {
            return Err(Error::Locked(e.to_string()));
        }
        Err(e) => return Err(Error::State(e.to_string())),
    };
    // The lease runs from no earlier than when the request that took it was sent.
    let fence = Arc::new(lock::Fence::new(spec.clone(), me.token.clone(), sent));
    let keeper = LeaseKeeper::start_fenced(lb.clone(), fence.clone());
    let mut lost = keeper.lost();
    let lost_reason = keeper.lost();
    tokio::spawn(async move {
        while lost.changed().await.is_ok() {
            if let Some(reason) = lost.borrow().clone() {
                let _ = interrupt_tx.send(Some(reason));
                return;
            }
        }
    });
    // Every command from here on is fenced: once the lease is not provably ours, nothing more
    // reaches a host or a load balancer.
    let fenced: executor::Sessions = sessions
        .iter()
        .map(|(name, session)| {
            let session: Arc<dyn Transport> = Arc::new(lock::Fenced::new(
                session.clone(),
                fence.clone(),
                *name == inv.balancer.lock_host,
            ));
            (name.clone(), session)
        })
        .collect();
    let result = with_lock(
        job,
        &fenced,
        lb.as_ref(),
        &me,
        &rollout_id,
        acquired,
        interrupt,
    )
    .await;
    keeper.stop().await;
    if let Some(reason) = lost_reason.borrow().clone() {
        return Err(Error::Locked(format!(
            "{reason}; every command after that was refused, so this controller changed nothing more. \
             Whoever holds the lock now finishes the rollout; see `{}`",
            job.options.resume_hint
        )));
    }
    if let Err(e) = lock::release(lb.as_ref(), &spec, &me.token).await {
        eprintln!("warning: could not release the deploy lock: {e}");
    }
    result
}

/// A switch-back only moves traffic, so the slot it moves traffic to must answer on every host
/// already. One probe per host, all at once; when any is silent nothing changes, and the
/// operator is told so in words rather than as a failed rollout.
async fn refuse_silent_slot(
    inv: &Inventory,
    sessions: &executor::Sessions,
    live: roller::inventory::Slot,
) -> Result<(), Error> {
    use roller::health::{HealthCheck, HealthSpec};
    let Some(bg) = inv.blue_green.as_ref() else {
        return Ok(());
    };
    let back = live.other();
    let probes = inv.hosts.iter().map(|h| async move {
        let spec = HealthSpec {
            timeout: inv.health.interval.max(Duration::from_secs(2)),
            successes: 1,
            ..HealthSpec::wait(&h.address, bg.port(back), inv)
        };
        let answered = match sessions.get(&h.name) {
            Some(session) => HttpOverSsh
                .probe(session.as_ref(), &spec, spec.timeout)
                .await
                .is_ok(),
            None => false,
        };
        (h.name.clone(), answered)
    });
    let silent: Vec<String> = futures::future::join_all(probes)
        .await
        .into_iter()
        .filter(|(_, answered)| !answered)
        .map(|(host, _)| host)
        .collect();
    if silent.is_empty() {
        return Ok(());
    }
    Err(Error::SwitchBackRefused {
        slot: back.as_str().to_string(),
        live: live.as_str().to_string(),
        hosts: silent,
    })
}

async fn with_lock(
    job: &Job,
    sessions: &executor::Sessions,
    lb: &dyn Transport,
    me: &LockInfo,
    rollout_id: &str,
    acquired: Acquired,
    interrupt: executor::Interrupt,
) -> Result<u8, Error> {
    let inv = &job.inventory;
    let journal = Arc::new(
        Journal::create(&job.journal_dir, &inv.app.name, rollout_id).map_err(|e| {
            Error::State(format!(
                "cannot write the journal in {}: {e}",
                job.journal_dir.display()
            ))
        })?,
    );
    journal.record(
        "lock",
        serde_json::json!({ "acquired": format!("{acquired:?}"), "holder": me, "rollout": rollout_id }),
    );
    if let Acquired::TookOver { expired } = &acquired {
        eprintln!("warning: took over an expired deploy lock from {expired}");
        record_lock_event(
            &job.journal_dir,
            &inv.app.name,
            "took-over",
            serde_json::json!({ "expired": expired, "by": me }),
        );
    }

    if let (JobKind::Resume(state), None) = (&job.kind, &job.artifact)
        && let Some(sha) = &state.artifact_sha256
    {
        verify_staged_jar(inv, sessions, &state.release, sha).await?;
    }
    // What an earlier rollout left behind decides what this one may do.
    let prior = read_state(lb, inv).await?;
    let ours = balancer_set(inv);
    for state in [prior.as_ref(), resumed_state(&job.kind)]
        .into_iter()
        .flatten()
    {
        if state.status.unfinished() && !state.balancers.is_empty() && state.balancers != ours {
            return Err(Error::Unfinished(format!(
                "rollout {} of {} was run with the load balancers [{}], this inventory names [{}]: \
                 finish it with the inventory it was started with",
                state.id,
                state.release,
                state.balancers.join(", "),
                ours.join(", ")
            )));
        }
    }
    let mut unfinished = BTreeSet::new();
    let mut before_prior = None;
    let previous = match (&job.kind, prior) {
        (JobKind::Resume(s) | JobKind::Recover(s), _) => Some(s.clone()),
        (JobKind::SwitchBack, _) => None,
        (JobKind::Rollout, Some(p)) if p.status.stranded() && p.id != rollout_id => {
            if p.release != job.release {
                return Err(Error::Unfinished(format!(
                    "rollout {} of {} is unfinished ({:?}); finish it with `{}` or undo it with `{}` first",
                    p.id, p.release, p.status, job.options.resume_hint, job.options.recover_hint
                )));
            }
            // The same release again: pick up where that one stopped.
            Some(p)
        }
        _ => None,
    };
    if let Some(p) = &previous {
        unfinished = p
            .hosts
            .iter()
            .filter(|(_, progress)| {
                matches!(
                    progress,
                    Progress::Drained | Progress::Switched | Progress::Restarted | Progress::Failed
                )
            })
            .map(|(h, _)| h.clone())
            .collect();
        before_prior = Some(p.before.clone());
    }
    let live_slot_before = previous.as_ref().and_then(|p| p.live_slot);

    let reporter = reporter(job, &journal);
    let observed = executor::preflight(
        inv,
        &job.balancer,
        &HttpOverSsh,
        sessions,
        job.artifact.as_ref().map(|a| a.bytes),
        reporter.as_ref(),
    )
    .await?;

    let recover_targets: Option<BTreeMap<String, String>> = match &job.kind {
        JobKind::Recover(state) => Some(
            state
                .before
                .iter()
                .filter_map(|(h, r)| r.clone().map(|r| (h.clone(), r)))
                .collect(),
        ),
        _ => None,
    };
    let release = match &recover_targets {
        Some(targets) => most_common(targets.values()).unwrap_or_else(|| job.release.clone()),
        None => job.release.clone(),
    };
    let live_slot = observed.live_slot(inv);
    let plan = match (&job.kind, live_slot) {
        (JobKind::SwitchBack, Some(live)) => {
            refuse_silent_slot(inv, sessions, live).await?;
            Plan::switch_back(inv, &job.balancer, live)?
        }
        (JobKind::SwitchBack, None) => unreachable!("pre-flight fails when no slot is live"),
        // A blue-green release only ever moved traffic between slots: recovering it moves
        // traffic back to the slot that had it at pre-flight, if it is not there already.
        (JobKind::Recover(s), Some(live)) if s.strategy == Strategy::BlueGreen => {
            let Some(before) = s.live_slot else {
                return Err(Error::Unfinished(format!(
                    "rollout {} of {} recorded no live slot, so roller cannot tell where traffic was before it; traffic is on {}: run `roller switch-back --inventory {}` to move it to {}",
                    s.id,
                    s.release,
                    live.as_str(),
                    job.inventory_path.display(),
                    live.other().as_str()
                )));
            };
            let mut plan = Plan::switch_back(inv, &job.balancer, live)?;
            if before == live {
                // Traffic never moved, or moved back already: nothing to change.
                plan.batches.clear();
            } else {
                refuse_silent_slot(inv, sessions, live).await?;
            }
            plan
        }
        _ => Plan::build(PlanInput {
            inventory: inv,
            balancer: &job.balancer,
            release: release.clone(),
            artifact: job.artifact.clone(),
            batch: job.batch,
            observed: Some(&observed.hosts),
            unfinished: &unfinished,
            targets: recover_targets.as_ref(),
            strategy: inv.strategy,
            live_slot,
            pause: job.pause,
            adopt: observed.adopting(inv),
        })?,
    };
    if let Some(targets) = &recover_targets {
        let lost: Vec<&String> = inv
            .hosts
            .iter()
            .map(|h| &h.name)
            .filter(|h| !targets.contains_key(*h))
            .collect();
        if !lost.is_empty() {
            eprintln!(
                "warning: no release from before the rollout is recorded for {}: left as they are",
                lost.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }

    let before = before_prior.unwrap_or_else(|| {
        observed
            .hosts
            .iter()
            .map(|(h, o)| (h.clone(), o.release.clone()))
            .collect()
    });
    // A resumed rollout without --artifact goes on with the jar it recorded.
    let resumed = match &job.kind {
        JobKind::Resume(s) => Some(s),
        _ => None,
    };
    let balancers = ours;
    let state = RolloutState {
        strategy: inv.strategy,
        id: rollout_id.to_string(),
        app: inv.app.name.clone(),
        release: job.release.clone(),
        artifact: job
            .artifact
            .as_ref()
            .and_then(|a| a.path.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| resumed.and_then(|s| s.artifact.clone())),
        artifact_sha256: job
            .artifact
            .as_ref()
            .map(|a| a.sha256.clone())
            .or_else(|| resumed.and_then(|s| s.artifact_sha256.clone())),
        batch: job.batch,
        on_failure: job.options.on_failure,
        max_failed_hosts: job.options.max_failed_hosts,
        controller: me.owner.clone(),
        started: journal::now_secs(),
        updated: journal::now_secs(),
        status: Status::Running,
        before,
        hosts: BTreeMap::new(),
        out_of_pool: Vec::new(),
        balancers,
        live_slot: live_slot_before.or(live_slot),
        found: match inv.discovery {
            Some(_) => inv
                .hosts
                .iter()
                .map(|h| FoundHost {
                    name: h.name.clone(),
                    address: h.address.clone(),
                })
                .collect(),
            None => Vec::new(),
        },
    };
    let store = JournalAndLockHost {
        session: sessions[&inv.balancer.lock_host].clone(),
        state_dir: inv.balancer.state_dir.clone(),
        journal: Some(journal.clone()),
    };
    let executor = Executor::new(ExecutorInput {
        plan: &plan,
        balancer: &job.balancer,
        health: &HttpOverSsh,
        sessions,
        reporter: reporter.clone(),
        options: Options {
            rollout_id: rollout_id.to_string(),
            ..job.options.clone()
        },
        interrupt,
        state: Some(KeptState {
            store: &store,
            initial: state,
        }),
        observed: &observed,
    });
    let report: RolloutReport = executor.run().await?;
    if matches!(job.kind, JobKind::Recover(_))
        && report.outcome == Outcome::Succeeded
        && let Some(mut state) = executor.last_state()
    {
        state.status = Status::Recovered;
        store.save(&state).await;
    }
    reporter.finish(&report);
    if job.output == Output::Text {
        print!("{}", report.render_text());
        eprintln!("journal: {}", journal.path().display());
    }
    let _ = &job.inventory_path;
    Ok(outcome_code(report.outcome))
}

fn resumed_state(kind: &JobKind) -> Option<&RolloutState> {
    match kind {
        JobKind::Resume(s) | JobKind::Recover(s) => Some(s),
        _ => None,
    }
}

fn reporter(job: &Job, journal: &Arc<Journal>) -> Arc<dyn Reporter> {
    let display: Arc<dyn Reporter> = match job.output {
        Output::Json => Arc::new(JsonReporter),
        Output::Text if std::io::stderr().is_terminal() => {
            let mut targets: Vec<String> =
                job.inventory.hosts.iter().map(|h| h.name.clone()).collect();
            targets.extend(job.inventory.balancer.hosts.iter().cloned());
            Arc::new(ProgressReporter::new(&targets))
        }
        Output::Text => Arc::new(PlainReporter),
    };
    Arc::new(Tee(vec![journal.clone(), display]))
}

fn most_common<'a>(values: impl Iterator<Item = &'a String>) -> Option<String> {
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v.clone())
}
