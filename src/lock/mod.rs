//! The deploy lock: a rollout changes live production state, so two must never run at once.
//!
//! The lock is a file, `<state_dir>/<app>.lock`, on the first load balancer, and every check and
//! change of it is one `sh` command over the [`Transport`] that holds `flock(1)` on
//! `<state_dir>/<app>.lock.mutex` while it runs. Check-and-set is therefore atomic on that host,
//! whichever controller machines race for it. Times are the load balancer's own `date +%s`, so
//! skew between controllers' clocks cannot make a live lease look expired.
//!
//! A holder keeps its lock alive by renewing a lease ([`LeaseKeeper`]); a controller that died
//! leaves a lease that runs out, and the next rollout takes it over ([`Acquired::TookOver`])
//! instead of needing a human. `roller unlock` ([`unlock`]) is the human's override.
//!
//! The lock file is `key=value` lines, in this order, written whole to `<app>.lock.new` and
//! renamed over the lock so a reader never sees half of one:
//!
//! ```text
//! token=<32 hex digits, unique per rollout>
//! owner=<user>@<controller host name>
//! pid=<controller pid>
//! release=<release being rolled out>
//! balancers=<the holder's load balancers, sorted, comma-separated>
//! started=<unix seconds, load-balancer clock>
//! lease_until=<unix seconds, load-balancer clock>
//! ```

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::time::{Instant, sleep};

use crate::remote;

mod lease;

use crate::transport::{ExecOutput, Transport, TransportError};
pub use lease::{FENCED_OUT, Fence, Fenced, LeaseKeeper};

/// Bounds each lock command; generous because the command may queue behind other controllers
/// on the mutex (each holds it for milliseconds, but the host may be slow).
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// How often [`acquire`] asks again while waiting for another rollout to finish.
pub const WAIT_POLL: Duration = Duration::from_secs(1);
/// After a failed renewal, retry sooner than the regular period so that one lost packet does
/// not eat a whole third of the lease.
const RENEW_RETRY: Duration = Duration::from_secs(1);

/// Who holds (or wants) the lock, as recorded in the lock file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LockInfo {
    /// Unique per rollout; the only thing that identifies the holder. Keep it (in the journal)
    /// to resume a rollout: re-acquiring with the same token succeeds.
    pub token: String,
    /// `user@host` of the controller, for humans.
    pub owner: String,
    /// The controller's process id, for humans.
    pub pid: u32,
    pub release: String,
    /// The load balancers the holder's inventory names, sorted and comma-separated: an
    /// inventory naming another set for the same app is shown both when it is refused.
    #[serde(default)]
    pub balancers: String,
    /// When this token first took the lock, unix seconds on the load balancer's clock.
    pub started: u64,
    /// The lease runs out after this second (load balancer's clock) unless renewed.
    pub lease_until: u64,
}

impl LockInfo {
    /// A would-be holder for a new rollout of `release`: a fresh token, this user, host and
    /// process. `started` and `lease_until` are 0 until the load balancer fills them in.
    pub fn new_for(release: &str) -> LockInfo {
        LockInfo {
            token: new_token(),
            owner: local_owner(),
            pid: std::process::id(),
            release: one_line(release),
            balancers: String::new(),
            started: 0,
            lease_until: 0,
        }
    }

    /// Reads the fields of a lock file; missing or garbled fields become empty / 0 rather than an
    /// error, because a damaged lock must still be shown to the operator who has to remove it.
    fn from_fields(fields: &HashMap<String, String>) -> LockInfo {
        // Shown to people: a lock file anyone could write must not drive their terminal.
        let text =
            |k: &str| crate::transport::printable(&fields.get(k).cloned().unwrap_or_default());
        let number = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        LockInfo {
            token: text("token"),
            owner: text("owner"),
            pid: fields.get("pid").and_then(|v| v.parse().ok()).unwrap_or(0),
            release: text("release"),
            balancers: text("balancers"),
            started: number("started"),
            lease_until: number("lease_until"),
        }
    }
}

impl std::fmt::Display for LockInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) rolling out {} since {}, lease until {} (token {})",
            self.owner,
            self.pid,
            self.release,
            timestamp(self.started),
            timestamp(self.lease_until),
            self.token
        )
    }
}

/// Which lock, and how long a lease lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockSpec {
    /// `balancer.state_dir`: absolute, or relative to the SSH login directory. Created by
    /// [`acquire`] if missing.
    pub state_dir: String,
    /// The application name; the lock file is `<state_dir>/<app>.lock`.
    pub app: String,
    /// How long a lock stays valid without renewal; rounded up to whole seconds, at least 1.
    pub lease: Duration,
}

impl LockSpec {
    pub(crate) fn lease_secs(&self) -> u64 {
        let secs = self.lease.as_secs() + u64::from(self.lease.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// How [`acquire`] got the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Nobody held it.
    Fresh,
    /// This token held it already (a resumed rollout); `started` is kept from the first time.
    Resumed,
    /// Another holder's lease had run out; journal who that was, its rollout may be half done.
    TookOver { expired: LockInfo },
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{}", held_message(holder, *now))]
    Held {
        holder: Box<LockInfo>,
        /// The load balancer's clock when it said so.
        now: u64,
    },
    /// The lock is held for the same app by an inventory that names other load balancers.
    #[error(
        "another rollout of this app holds the deploy lock with a different set of load balancers: \
         its inventory names [{theirs}], this one [{ours}]; one fleet must have one inventory's set. {}",
        held_message(holder, *now),
        theirs = holder.balancers
    )]
    OtherBalancers {
        holder: Box<LockInfo>,
        now: u64,
        ours: String,
    },
    #[error("{}", lost_message(holder.as_ref()))]
    Lost { holder: Option<LockInfo> },
    #[error("deploy lock: {0}")]
    Transport(#[from] TransportError),
    #[error("deploy lock: {0}")]
    Remote(String),
}

fn held_message(holder: &LockInfo, now: u64) -> String {
    format!(
        "another rollout holds the deploy lock: {owner} (pid {pid}) is rolling out {release} since {started} ({ago} ago); \
         its lease runs until {until} ({left}). Wait for it to finish (--lock-wait DURATION), or, if that controller is gone, \
         let the lease expire or run `roller unlock`",
        owner = holder.owner,
        pid = holder.pid,
        release = holder.release,
        started = timestamp(holder.started),
        ago = humantime::format_duration(Duration::from_secs(now.saturating_sub(holder.started))),
        until = timestamp(holder.lease_until),
        left = match holder.lease_until.checked_sub(now) {
            Some(left) => format!(
                "{} left",
                humantime::format_duration(Duration::from_secs(left))
            ),
            None => "expired".to_string(),
        },
    )
}

fn lost_message(holder: Option<&LockInfo>) -> String {
    match holder {
        Some(holder) => format!("deploy lock lost: it is now held by {holder}"),
        None => "deploy lock lost: the lock file is gone (removed with `roller unlock`?)".into(),
    }
}

fn timestamp(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// A command's `key=value` output: its own lines, and the lock file it showed (`old.` lines).
#[derive(Debug, Default)]
struct Reply {
    fields: HashMap<String, String>,
    old: HashMap<String, String>,
}

impl Reply {
    fn result(&self) -> &str {
        self.fields.get("result").map(String::as_str).unwrap_or("")
    }

    fn number(&self, key: &str, what: &str) -> Result<u64, LockError> {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| LockError::Remote(format!("{what}: no valid {key} in the reply")))
    }

    fn old_lock(&self) -> Option<LockInfo> {
        (!self.old.is_empty()).then(|| LockInfo::from_fields(&self.old))
    }

    fn unexpected(&self, what: &str) -> LockError {
        LockError::Remote(format!("{what}: unexpected reply {:?}", self.result()))
    }
}

async fn run(t: &dyn Transport, command: &str, what: &str) -> Result<Reply, LockError> {
    run_within(t, command, what, COMMAND_DEADLINE).await
}

async fn run_within(
    t: &dyn Transport,
    command: &str,
    what: &str,
    deadline: Duration,
) -> Result<Reply, LockError> {
    let out = t.exec(command, None, deadline).await?;
    parse_reply(&out, what)
}

fn parse_reply(out: &ExecOutput, what: &str) -> Result<Reply, LockError> {
    if !out.success() {
        let status = out
            .status
            .map_or_else(|| "no exit status".to_string(), |s| format!("exit {s}"));
        let stderr = out.stderr_text();
        let detail = if stderr.is_empty() {
            status
        } else {
            format!("{stderr} ({status})")
        };
        return Err(LockError::Remote(format!("{what} failed: {detail}")));
    }
    let mut reply = Reply::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        // The first occurrence wins, as it does for the `sed -n` reads in the scripts.
        match key.strip_prefix("old.") {
            Some(key) => reply.old.entry(key.to_string()),
            None => reply.fields.entry(key.to_string()),
        }
        .or_insert_with(|| value.to_string());
    }
    Ok(reply)
}

/// Takes the lock for `me` (from [`LockInfo::new_for`], or the journaled one of a rollout being
/// resumed) and returns it as written, with the load balancer's times.
///
/// Another live lease fails with [`LockError::Held`] after one round trip, unless `wait` is given:
/// then it asks again every [`WAIT_POLL`] until the lock is free or `wait` has passed. An expired
/// lease is taken over ([`Acquired::TookOver`]).
pub async fn acquire(
    t: &dyn Transport,
    spec: &LockSpec,
    me: &LockInfo,
    wait: Option<Duration>,
) -> Result<(LockInfo, Acquired), LockError> {
    acquire_sent(t, spec, me, wait)
        .await
        .map(|(info, how, _)| (info, how))
}

/// [`acquire`], also returning when the request that took the lock was sent: the lease runs
/// from no earlier than that, which is what a [`Fence`] counts from (after a long
/// `--lock-wait`, the first request's time would be long past).
pub async fn acquire_sent(
    t: &dyn Transport,
    spec: &LockSpec,
    me: &LockInfo,
    wait: Option<Duration>,
) -> Result<(LockInfo, Acquired, Instant), LockError> {
    let began = Instant::now();
    loop {
        let sent = Instant::now();
        match acquire_once(t, spec, me, None).await {
            Err(held @ LockError::Held { .. }) => {
                let Some(wait) = wait else {
                    return Err(held);
                };
                let waited = began.elapsed();
                if waited >= wait {
                    return Err(held);
                }
                tracing::debug!(error = %held, "deploy lock busy, waiting");
                sleep(WAIT_POLL.min(wait - waited)).await;
            }
            other => return other.map(|(info, how)| (info, how, sent)),
        }
    }
}

/// Takes the lock from a holder whose lease still runs but whose process is provably gone
/// ([`holder_is_gone`]); fails with [`LockError::Held`] if the lock changed hands meanwhile.
pub async fn take_over_gone(
    t: &dyn Transport,
    spec: &LockSpec,
    me: &LockInfo,
    gone: &LockInfo,
) -> Result<(LockInfo, Acquired), LockError> {
    acquire_once(t, spec, me, Some(&gone.token)).await
}

/// Whether the holder of a lock is provably dead: it ran on this machine (same host name) and
/// no process has its pid any more. Anything else (another machine, a live pid, perhaps reused)
/// counts as alive: wrongly waiting is safe, wrongly taking over is not.
pub fn holder_is_gone(holder: &LockInfo) -> bool {
    let host = |owner: &str| owner.rsplit_once('@').map(|(_, h)| h.to_string());
    let (Some(theirs), Some(ours)) = (host(&holder.owner), host(&local_owner())) else {
        return false;
    };
    // A token that is not one roller makes is not a lock roller took: never take it over.
    theirs == ours
        && crate::journal::is_id(&holder.token)
        && holder.pid != 0
        && holder.pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{}", holder.pid)).exists()
}

async fn acquire_once(
    t: &dyn Transport,
    spec: &LockSpec,
    me: &LockInfo,
    gone: Option<&str>,
) -> Result<(LockInfo, Acquired), LockError> {
    const WHAT: &str = "taking the deploy lock";
    let reply = run(t, &remote::lock::acquire(spec, me, gone), WHAT).await?;
    let how = match reply.result() {
        "held" => {
            let holder = LockInfo::from_fields(&reply.old);
            let now = reply.number("now", WHAT)?;
            let ours = one_line(&me.balancers);
            if !holder.balancers.is_empty() && !ours.is_empty() && holder.balancers != ours {
                return Err(LockError::OtherBalancers {
                    holder: Box::new(holder),
                    now,
                    ours,
                });
            }
            return Err(LockError::Held {
                holder: Box::new(holder),
                now,
            });
        }
        "fresh" => Acquired::Fresh,
        "resumed" => Acquired::Resumed,
        "took_over" => Acquired::TookOver {
            expired: LockInfo::from_fields(&reply.old),
        },
        _ => return Err(reply.unexpected(WHAT)),
    };
    let info = LockInfo {
        token: one_line(&me.token),
        owner: one_line(&me.owner),
        pid: me.pid,
        release: one_line(&me.release),
        balancers: one_line(&me.balancers),
        started: reply.number("started", WHAT)?,
        lease_until: reply.number("lease_until", WHAT)?,
    };
    Ok((info, how))
}

/// Extends the lease of `token` by `spec.lease` from now; returns the new `lease_until`. Fails
/// with [`LockError::Lost`] if the lock is gone or held by another token.
pub async fn renew(t: &dyn Transport, spec: &LockSpec, token: &str) -> Result<u64, LockError> {
    renew_within(t, spec, token, COMMAND_DEADLINE).await
}

async fn renew_within(
    t: &dyn Transport,
    spec: &LockSpec,
    token: &str,
    deadline: Duration,
) -> Result<u64, LockError> {
    const WHAT: &str = "renewing the deploy lock";
    let reply = run_within(t, &remote::lock::renew(spec, token), WHAT, deadline).await?;
    match reply.result() {
        "renewed" => reply.number("lease_until", WHAT),
        "lost" | "absent" => Err(LockError::Lost {
            holder: reply.old_lock(),
        }),
        _ => Err(reply.unexpected(WHAT)),
    }
}

/// Removes the lock if `token` holds it. An absent lock is fine (nothing to give back); one held
/// by another token is [`LockError::Lost`] and is left alone.
pub async fn release(t: &dyn Transport, spec: &LockSpec, token: &str) -> Result<(), LockError> {
    const WHAT: &str = "releasing the deploy lock";
    let reply = run(t, &remote::lock::release(spec, token), WHAT).await?;
    match reply.result() {
        "released" | "absent" => Ok(()),
        "lost" => Err(LockError::Lost {
            holder: reply.old_lock(),
        }),
        _ => Err(reply.unexpected(WHAT)),
    }
}

/// Removes the lock whoever holds it (`roller unlock`); returns what was removed.
pub async fn unlock(t: &dyn Transport, spec: &LockSpec) -> Result<Option<LockInfo>, LockError> {
    const WHAT: &str = "removing the deploy lock";
    let reply = run(t, &remote::lock::unlock(spec), WHAT).await?;
    match reply.result() {
        "removed" => Ok(Some(LockInfo::from_fields(&reply.old))),
        "absent" => Ok(None),
        _ => Err(reply.unexpected(WHAT)),
    }
}

/// The lock as it is now, if any (whether or not its lease has run out).
pub async fn read(t: &dyn Transport, spec: &LockSpec) -> Result<Option<LockInfo>, LockError> {
    const WHAT: &str = "reading the deploy lock";
    let reply = run(t, &remote::lock::read(spec), WHAT).await?;
    match reply.result() {
        "present" => Ok(Some(LockInfo::from_fields(&reply.old))),
        "absent" => Ok(None),
        _ => Err(reply.unexpected(WHAT)),
    }
}

/// A value for one `key=value` line: control characters would split or hide lines.
pub(crate) fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// A new identifier (32 hex digits) for a rollout: separate from the lock token, which belongs to
/// one controller process.
pub fn new_id() -> String {
    new_token()
}

/// 128 bits from the OS random source, hashed together with the time, pid and a per-process
/// counter: unique even if `/dev/urandom` were unreadable, without another dependency.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = Sha256::new();
    let mut random = [0u8; 32];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom")
        && urandom.read_exact(&mut random).is_ok()
    {
        hasher.update(random);
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.update(nanos.to_le_bytes());
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    hex::encode(&hasher.finalize()[..16])
}

/// `user@host` of this controller, for the humans reading a lock.
fn local_owner() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let host = ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    one_line(&format!("{user}@{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &str) -> LockSpec {
        LockSpec {
            state_dir: dir.into(),
            app: "shop".into(),
            lease: Duration::from_millis(1500),
        }
    }

    #[test]
    fn tokens_are_128_bit_hex_and_unique() {
        let a = new_token();
        let b = new_token();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn lease_rounds_up_to_whole_seconds() {
        assert_eq!(spec("s").lease_secs(), 2);
        let mut s = spec("s");
        s.lease = Duration::ZERO;
        assert_eq!(s.lease_secs(), 1);
    }

    #[test]
    fn replies_keep_the_old_lock_apart() {
        let out = ExecOutput {
            status: Some(0),
            stdout: b"old.token=abc\nold.pid=7\nold.lease_until=10\nresult=held\nnow=5\n".to_vec(),
            stderr: vec![],
        };
        let reply = parse_reply(&out, "x").unwrap();
        assert_eq!(reply.result(), "held");
        let old = reply.old_lock().unwrap();
        assert_eq!(
            (old.token.as_str(), old.pid, old.lease_until),
            ("abc", 7, 10)
        );
        assert_eq!(reply.number("now", "x").unwrap(), 5);
    }
}
