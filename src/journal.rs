//! What survives roller's own death: a local append-only journal of every step, flushed to disk
//! before and after the step runs, and a summary of the rollout's state kept on the first load
//! balancer, so that `roller resume` or `roller recover` can finish from any machine.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::discovery::{FoundHost, check_unique};
use crate::executor::FailurePolicy;
use crate::inventory::Inventory;
use crate::plan::{BatchSize, is_release};
use crate::report::{Event, Reporter, RolloutReport};

/// How far a host got in the rollout that is (or was) running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Progress {
    /// Not started, or skipped because it already ran the release.
    Pending,
    /// Out of the pool; `current` not yet moved.
    Drained,
    /// `current` may point at the new release; the process may still run the old one.
    Switched,
    /// Restarted on the new release, not yet known healthy.
    Restarted,
    /// Healthy on the new release (and back in the pool, or about to be).
    Done,
    /// Its batch failed and it is back on its previous release.
    RolledBack,
    /// Could not be restored; out of the pool.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Running,
    Succeeded,
    RolledBack,
    Halted,
    Interrupted,
    /// Finished with hosts that need a human: see the report's recovery steps.
    Incomplete,
    /// `roller recover` put every host back on its release from before this rollout.
    Recovered,
}

impl Status {
    /// A rollout in these states may have left hosts out of the pool or half deployed: no
    /// other release may start before `resume` or `recover` has dealt with it.
    pub fn stranded(self) -> bool {
        matches!(self, Status::Running | Status::Halted | Status::Incomplete)
    }

    /// `resume` and `recover` apply: stranded, or interrupted with batches still to go.
    pub fn unfinished(self) -> bool {
        self.stranded() || self == Status::Interrupted
    }
}

/// What a run set out to do: a new release, or a way back to one the hosts already hold.
/// Recorded so that `resume`, `recover` and the history tell a rollback from a rollout: a
/// resumed rollback needs no jar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    #[default]
    Rollout,
    /// `roller rollback`: `current` back to a release already on every host, no upload.
    Rollback,
}

/// The rollout as `resume` and `recover` need to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    #[serde(default)]
    pub strategy: crate::inventory::Strategy,
    /// States written before rollbacks existed were rollouts.
    #[serde(default)]
    pub kind: RunKind,
    /// 32 hex digits; names the local journal and the canary decisions. Not the lock's token:
    /// that belongs to one controller process.
    pub id: String,
    pub app: String,
    pub release: String,
    /// The jar's file name, for people: never read back as a path.
    pub artifact: Option<String>,
    pub artifact_sha256: Option<String>,
    /// `--batch` as given, written as the flag spells it (`"2"`, `"25%"`).
    #[serde(with = "batch_text")]
    pub batch: BatchSize,
    /// `--on-failure`, written as the flag spells it (`"rollback-batch"`).
    #[serde(with = "policy_text")]
    pub on_failure: FailurePolicy,
    pub max_failed_hosts: usize,
    pub controller: String,
    pub started: u64,
    pub updated: u64,
    pub status: Status,
    /// Each host's live release at pre-flight: where `recover` returns it.
    pub before: BTreeMap<String, Option<String>>,
    pub hosts: BTreeMap<String, Progress>,
    /// Hosts that the load balancers have marked `down`, as last written.
    pub out_of_pool: Vec<String>,
    /// The load balancers of the inventory that ran it, sorted.
    #[serde(default)]
    pub balancers: Vec<String>,
    /// Blue-green: the slot that had traffic at pre-flight, where `recover` sends it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_slot: Option<crate::inventory::Slot>,
    /// The hosts a discovering inventory found when the rollout started (none for `[[hosts]]`,
    /// and in states written before discovery existed): `resume` and `recover` act on these, not
    /// on a fresh answer from the API, which may have changed as the group scaled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub found: Vec<FoundHost>,
    /// The hosts `--hosts` / `--tag` selected, sorted; empty for every host. `resume` and
    /// `recover` act on these alone, as the rollout did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selected: Vec<String>,
}

/// Whether `s` is what [`crate::lock::new_id`] makes: 32 lowercase hex digits.
pub fn is_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl RolloutState {
    /// What is wrong with a state read back from a load balancer or a journal, checked against
    /// the rules roller writes it by: anyone who can write that file must not be able to steer
    /// roller into running their text as a command or using it as a local path.
    pub fn problems(&self, inv: &Inventory) -> Vec<String> {
        let mut problems = Vec::new();
        let shown = |s: &str| format!("{:?}", s.chars().take(80).collect::<String>());
        if !is_id(&self.id) {
            problems.push(format!("id {} is not 32 hex digits", shown(&self.id)));
        }
        if self.app != inv.app.name {
            problems.push(format!(
                "app {} is not this inventory's app {:?}",
                shown(&self.app),
                inv.app.name
            ));
        }
        if !is_release(&self.release) {
            problems.push(format!(
                "release {} breaks the release rules",
                shown(&self.release)
            ));
        }
        if let Some(jar) = &self.artifact
            && (jar.is_empty()
                || jar.len() > 255
                || jar.contains('/')
                || jar == "."
                || jar == ".."
                || jar.chars().any(char::is_control))
        {
            problems.push(format!("artifact {} is not a file name", shown(jar)));
        }
        if let Some(sha) = &self.artifact_sha256
            && !is_sha256(sha)
        {
            problems.push(format!("artifact_sha256 {} is not a SHA-256", shown(sha)));
        }
        if self.controller.len() > 256 || self.controller.chars().any(char::is_control) {
            problems.push(format!(
                "controller {} is not a user@host",
                shown(&self.controller)
            ));
        }
        let found: Vec<(String, FoundHost)> = self
            .found
            .iter()
            .map(|f| ("found".to_string(), f.clone()))
            .collect();
        problems.extend(found.iter().filter_map(|(origin, f)| f.problem(origin)));
        if let Err(p) = check_unique(&found) {
            problems.push(p);
        }
        // A discovering inventory's hosts are the ones this rollout found, or, for a new one,
        // the ones found just now.
        let discovering = inv.discovery.is_some();
        let known = |h: &String| {
            inv.host(h).is_some() || (discovering && self.found.iter().any(|f| &f.name == h))
        };
        for (host, release) in &self.before {
            if !known(host) {
                problems.push(format!(
                    "before names {}, not a host of the inventory",
                    shown(host)
                ));
            }
            if let Some(r) = release
                && !is_release(r)
            {
                problems.push(format!(
                    "before.{} is {}, which breaks the release rules",
                    shown(host),
                    shown(r)
                ));
            }
        }
        for lb in &self.balancers {
            if lb.is_empty()
                || lb.len() > 255
                || !lb
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
            {
                problems.push(format!(
                    "balancers names {}, not a host name or address",
                    shown(lb)
                ));
            }
        }
        for host in self
            .hosts
            .keys()
            .chain(&self.out_of_pool)
            .chain(&self.selected)
        {
            if !known(host) {
                problems.push(format!(
                    "hosts names {}, not a host of the inventory",
                    shown(host)
                ));
            }
        }
        problems
    }
}

/// The state file keeps `batch` as text, as `--batch` takes it: files written by any version
/// of roller read alike, and a person reading the file sees the flag they gave.
mod batch_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::plan::BatchSize;

    pub fn serialize<S: Serializer>(batch: &BatchSize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::batch_flag(*batch))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BatchSize, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map_err(|e| D::Error::custom(format!("batch is not a batch size: {e}")))
    }
}

/// `batch` as `--batch` spells it.
pub fn batch_flag(batch: BatchSize) -> String {
    match batch {
        BatchSize::Hosts(n) => n.to_string(),
        BatchSize::Percent(p) => format!("{p}%"),
    }
}

/// The state file keeps `on_failure` as `--on-failure` spells it.
mod policy_text {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::executor::FailurePolicy;

    const POLICIES: [FailurePolicy; 3] = [
        FailurePolicy::RollbackBatch,
        FailurePolicy::RollbackAll,
        FailurePolicy::Halt,
    ];

    pub fn serialize<S: Serializer>(policy: &FailurePolicy, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(policy.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FailurePolicy, D::Error> {
        let text = String::deserialize(d)?;
        POLICIES
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| {
                let shown: String = text.chars().take(80).collect();
                D::Error::custom(format!(
                    "on_failure {shown:?} is not a policy: rollback-batch, rollback-all or halt"
                ))
            })
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The summary's file on the load balancer.
pub fn state_file(state_dir: &str, app: &str) -> String {
    format!("{state_dir}/{app}.rollout.json")
}

/// Replaces the summary atomically with the JSON on stdin.
pub fn write_state_command(state_dir: &str, app: &str) -> String {
    crate::remote::state::write(state_dir, &state_file(state_dir, app))
}

/// Prints the summary, or nothing when there is none.
pub fn read_state_command(state_dir: &str, app: &str) -> String {
    crate::remote::state::read(&state_file(state_dir, app))
}

/// The local, append-only record of one rollout: one JSON document per line.
pub struct Journal {
    path: PathBuf,
    file: Mutex<File>,
}

impl Journal {
    /// Where journals go by default: `$XDG_STATE_HOME/roller`, else `~/.local/state/roller`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("roller");
        }
        match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".local/state/roller"),
            None => PathBuf::from(".roller"),
        }
    }

    /// Opens (or creates) `<dir>/<app>/<id>.jsonl`: 0600 in a 0700 directory, since a journal
    /// tells who deploys what where.
    pub fn create(dir: &Path, app: &str, id: &str) -> std::io::Result<Journal> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let dir = dir.join(app);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let path = dir.join(format!("{id}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        Ok(Journal {
            path,
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record and forces it to disk: the journal is only worth something if it
    /// holds what happened up to the moment the controller died.
    pub fn record(&self, kind: &str, body: serde_json::Value) {
        let line = serde_json::json!({ "at_ms": now_ms(), "kind": kind, "body": body });
        let mut file = self.file.lock().expect("journal lock");
        let written = writeln!(file, "{line}").and_then(|()| file.sync_data());
        if let Err(e) = written {
            tracing::error!("cannot write journal {}: {e}", self.path.display());
        }
    }

    pub fn record_state(&self, state: &RolloutState) {
        self.record("state", serde_json::to_value(state).unwrap_or_default());
    }

    /// The last state recorded in the journal at `path`.
    pub fn last_state(path: &Path) -> std::io::Result<Option<RolloutState>> {
        let text = std::fs::read_to_string(path)?;
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["kind"] == "state")
            .filter_map(|v| serde_json::from_value(v["body"].clone()).ok())
            .next_back())
    }
}

impl Reporter for Journal {
    fn event(&self, event: &Event) {
        self.record("step", serde_json::to_value(event).unwrap_or_default());
    }

    fn finish(&self, report: &RolloutReport) {
        self.record("report", serde_json::to_value(report).unwrap_or_default());
    }
}

/// Sends every event to several reporters: the terminal or JSON output, and the journal.
pub struct Tee(pub Vec<std::sync::Arc<dyn Reporter>>);

impl Reporter for Tee {
    fn event(&self, event: &Event) {
        for r in &self.0 {
            r.event(event);
        }
    }

    fn finish(&self, report: &RolloutReport) {
        for r in &self.0 {
            r.finish(report);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_commands_quote_the_directory() {
        assert_eq!(
            write_state_command("/etc/nginx/my dir", "shop"),
            "umask 077; mkdir -p -m 700 '/etc/nginx/my dir' && t=$(mktemp '/etc/nginx/my dir/shop.rollout.json.XXXXXX') && \
             { cat > \"$t\" && mv -f \"$t\" '/etc/nginx/my dir/shop.rollout.json' || { rm -f \"$t\"; exit 1; }; }"
        );
    }

    #[test]
    fn batch_and_failure_policy_are_written_as_the_flags_spell_them() {
        let mut state: RolloutState = serde_json::from_value(serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "app": "shop", "release": "v2",
            "artifact": null, "artifact_sha256": null, "batch": "25%", "on_failure": "rollback-all",
            "max_failed_hosts": 0, "controller": "me@here", "started": 1, "updated": 1,
            "status": "running", "before": {}, "hosts": {}, "out_of_pool": [],
        }))
        .unwrap();
        assert_eq!(state.batch, BatchSize::Percent(25));
        assert_eq!(state.on_failure, FailurePolicy::RollbackAll);
        state.batch = BatchSize::Hosts(2);
        state.on_failure = FailurePolicy::Halt;
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["batch"], "2");
        assert_eq!(json["on_failure"], "halt");
    }

    #[test]
    fn a_state_with_an_unknown_policy_or_batch_does_not_read() {
        let mut json = serde_json::json!({
            "id": "0123456789abcdef0123456789abcdef", "app": "shop", "release": "v2",
            "artifact": null, "artifact_sha256": null, "batch": "1", "on_failure": "rollback-batch",
            "max_failed_hosts": 0, "controller": "me@here", "started": 1, "updated": 1,
            "status": "running", "before": {}, "hosts": {}, "out_of_pool": [],
        });
        assert!(serde_json::from_value::<RolloutState>(json.clone()).is_ok());
        json["on_failure"] = "rm -rf".into();
        let err = serde_json::from_value::<RolloutState>(json.clone()).unwrap_err();
        assert!(err.to_string().contains("is not a policy"), "{err}");
        json["on_failure"] = "halt".into();
        json["batch"] = "0%".into();
        let err = serde_json::from_value::<RolloutState>(json).unwrap_err();
        assert!(
            err.to_string().contains("batch is not a batch size"),
            "{err}"
        );
    }

    #[test]
    fn the_journal_keeps_the_last_state_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = RolloutState {
            strategy: crate::inventory::Strategy::Rolling,
            kind: RunKind::Rollout,
            id: "0123456789abcdef0123456789abcdef".into(),
            app: "shop".into(),
            release: "v2".into(),
            artifact: None,
            artifact_sha256: None,
            batch: BatchSize::Hosts(1),
            on_failure: FailurePolicy::RollbackBatch,
            max_failed_hosts: 0,
            controller: "me@here".into(),
            started: 1,
            updated: 1,
            status: Status::Running,
            live_slot: None,
            before: BTreeMap::new(),
            hosts: BTreeMap::from([("web-1".to_string(), Progress::Drained)]),
            out_of_pool: vec!["web-1".into()],
            balancers: vec!["10.0.0.5".into()],
            found: vec![FoundHost {
                name: "web-1".into(),
                address: "10.0.1.11".into(),
            }],
            selected: vec!["web-1".into()],
        };
        let journal = Journal::create(dir.path(), "shop", &state.id).unwrap();
        journal.record_state(&state);
        state.hosts.insert("web-1".into(), Progress::Switched);
        journal.record_state(&state);
        drop(journal);
        let path = dir.path().join(format!("shop/{}.jsonl", state.id));
        assert_eq!(Journal::last_state(&path).unwrap(), Some(state));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }
}
