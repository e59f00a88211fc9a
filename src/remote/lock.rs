//! The deploy lock's commands on the lock host: each one a single `sh` script that takes the
//! lock's mutex (`flock(1)`) for as long as it runs, so check-and-set is atomic there whichever
//! controllers race. The file format and the protocol are described in [`crate::lock`].

use super::{Configured, Sh, q, sh};
use crate::lock::{FENCED_OUT, LockInfo, LockSpec, one_line};

/// How long a command waits for the mutex on the load balancer before giving up; below the
/// lock's command deadline so that the host reports why instead of our timer cutting it off.
pub const MUTEX_WAIT_SECS: u32 = 10;
/// Exit status our scripts use for a problem they explain on stderr.
pub const SCRIPT_FAILURE: u32 = 3;

/// Prints the current lock file with every line prefixed `old.`, so it can share the output
/// with the command's own `key=value` lines.
const SHOW_OLD: &str = "sed 's/^/old./' \"$f\"; ";
const READ_TOKEN: &str = "cur=$(sed -n 's/^token=//p' \"$f\"); ";
const WRITE_FAILED: &str = "{ printf 'cannot write %s\\n' \"$f\" >&2; exit 3; }";

/// The shell prologue every command starts with: names the files. Only values quoted here
/// ever reach the shell; everything after refers to `$d` and `$f`.
fn files(spec: &LockSpec) -> Sh {
    sh![
        "d=",
        q(&spec.state_dir),
        "; f=\"$d\"/",
        q(&format!("{}.lock", spec.app)),
        "; "
    ]
}

/// Makes sure the state directory exists and is writable, then takes the mutex for the rest of
/// the command (it is released when the shell exits and closes fd 9).
fn locked_prologue(spec: &LockSpec, create: bool) -> Sh {
    let missing = if create {
        sh!["mkdir -p -m 700 -- \"$d\" 2>/dev/null; chmod 700 -- \"$d\" 2>/dev/null; "]
    } else {
        // Nothing to renew, release or remove, and no reason to create a directory for that.
        sh!["if [ ! -d \"$d\" ]; then echo result=absent; exit 0; fi; "]
    };
    mutex_prologue(spec, missing, SCRIPT_FAILURE)
}

/// `umask 077`: the lock, its mutex and its temporary file are the deploy tool's business only.
fn mutex_prologue(spec: &LockSpec, missing: Sh, fail: u32) -> Sh {
    sh![
        "umask 077; ",
        files(spec),
        missing,
        "if [ ! -d \"$d\" ] || [ ! -w \"$d\" ]; then printf 'lock state directory %s cannot be created or is not writable\\n' \"$d\" >&2; exit ",
        fail,
        "; fi; command -v flock >/dev/null 2>&1 || { echo 'flock(1) from util-linux is not installed on the load balancer' >&2; exit ",
        fail,
        "; }; exec 9>>\"$f.mutex\" || exit ",
        fail,
        "; flock -w ",
        MUTEX_WAIT_SECS,
        " 9 || { printf 'timed out after ",
        MUTEX_WAIT_SECS,
        "s waiting for %s\\n' \"$f.mutex\" >&2; exit ",
        fail,
        "; }; now=$(date +%s); ",
    ]
}

/// Takes the lock for `me`, prints `result=fresh|resumed|took_over|held`, `now=`, and for
/// every result but `held` the new `started=` and `lease_until=`; the previous lock, if any, as
/// `old.` lines. `resumed` only answers a repeated request of the same process (its token is
/// its own); with `gone`, a live lease whose token is `gone` (a holder the caller proved dead)
/// is taken over too.
pub fn acquire(spec: &LockSpec, me: &LockInfo, gone: Option<&str>) -> String {
    sh![
        locked_prologue(spec, true),
        "tok=",
        q(&one_line(&me.token)),
        "; gone=",
        q(&one_line(gone.unwrap_or(""))),
        "; started=$now; result=fresh; if [ -f \"$f\" ]; then ",
        SHOW_OLD,
        READ_TOKEN,
        "if [ \"$cur\" = \"$tok\" ]; then result=resumed; s=$(sed -n 's/^started=//p' \"$f\"); \
         case $s in ''|*[!0-9]*) ;; *) started=$s;; esac; \
         elif [ -n \"$gone\" ] && [ \"$cur\" = \"$gone\" ]; then result=took_over; \
         else exp=$(sed -n 's/^lease_until=//p' \"$f\"); \
         case $exp in ''|*[!0-9]*) printf 'lock file %s has no valid lease_until; inspect it and run roller unlock\\n' \"$f\" >&2; exit ",
        SCRIPT_FAILURE,
        ";; esac; if [ \"$exp\" -ge \"$now\" ]; then echo result=held; echo now=$now; exit 0; fi; \
         result=took_over; fi; fi; exp=$((now + ",
        spec.lease_secs(),
        ")); printf 'token=%s\\nowner=%s\\npid=%s\\nrelease=%s\\nbalancers=%s\\nstarted=%s\\nlease_until=%s\\n' \"$tok\" ",
        q(&one_line(&me.owner)),
        " ",
        me.pid,
        " ",
        q(&one_line(&me.release)),
        " ",
        q(&one_line(&me.balancers)),
        " \"$started\" \"$exp\" > \"$f.new\" && mv -f \"$f.new\" \"$f\" || ",
        WRITE_FAILED,
        "; echo result=$result; echo now=$now; echo started=$started; echo lease_until=$exp",
    ]
    .into_string()
}

/// Extends the lease if `token` still holds the lock: prints `result=renewed` and the new
/// `lease_until=`, or `result=lost` / `result=absent` with the current lock as `old.` lines.
pub fn renew(spec: &LockSpec, token: &str) -> String {
    sh![
        locked_prologue(spec, false),
        "tok=",
        q(&one_line(token)),
        "; if [ ! -f \"$f\" ]; then echo result=absent; exit 0; fi; ",
        READ_TOKEN,
        "if [ \"$cur\" != \"$tok\" ]; then echo result=lost; ",
        SHOW_OLD,
        "exit 0; fi; exp=$((now + ",
        spec.lease_secs(),
        ")); { grep -v '^lease_until=' \"$f\"; echo lease_until=$exp; } > \"$f.new\" && mv -f \"$f.new\" \"$f\" || ",
        WRITE_FAILED,
        "; echo result=renewed; echo lease_until=$exp",
    ]
    .into_string()
}

/// Removes the lock only if `token` holds it: prints `result=released`, `result=absent`, or
/// `result=lost` with the other holder as `old.` lines.
pub fn release(spec: &LockSpec, token: &str) -> String {
    sh![
        locked_prologue(spec, false),
        "tok=",
        q(&one_line(token)),
        "; if [ ! -f \"$f\" ]; then echo result=absent; exit 0; fi; ",
        READ_TOKEN,
        "if [ \"$cur\" != \"$tok\" ]; then echo result=lost; ",
        SHOW_OLD,
        "exit 0; fi; rm -f \"$f\" || exit ",
        SCRIPT_FAILURE,
        "; echo result=released",
    ]
    .into_string()
}

/// Removes whatever lock is there (`roller unlock`): prints it as `old.` lines and
/// `result=removed`, or `result=absent`.
pub fn unlock(spec: &LockSpec) -> String {
    sh![
        locked_prologue(spec, false),
        "if [ ! -f \"$f\" ]; then echo result=absent; exit 0; fi; ",
        SHOW_OLD,
        "rm -f \"$f\" || exit ",
        SCRIPT_FAILURE,
        "; echo result=removed",
    ]
    .into_string()
}

/// Prints the lock as `old.` lines and `result=present`, or `result=absent`. Takes no mutex and
/// creates nothing: the lock file is only ever replaced by rename, so it is read whole.
pub fn read(spec: &LockSpec) -> String {
    sh![
        files(spec),
        "if [ -f \"$f\" ]; then ",
        SHOW_OLD,
        "echo result=present; else echo result=absent; fi",
    ]
    .into_string()
}

/// Prints the lock host's clock (unix seconds), which lock leases are measured by.
pub fn clock() -> String {
    sh!["date +%s"].into_string()
}

/// Wraps `command` (one roller already built) so that it runs only while the lock's mutex is
/// held and the lock file still names `token` with a live lease; otherwise it exits
/// [`FENCED_OUT`]. The command does not inherit the mutex's descriptor, so nothing it leaves
/// running can hold the lock.
pub fn guard(spec: &LockSpec, token: &str, command: &str) -> String {
    let gone = sh![
        "if [ ! -d \"$d\" ]; then echo 'fenced out: the lock state directory is gone' >&2; exit ",
        FENCED_OUT,
        "; fi; "
    ];
    sh![
        mutex_prologue(spec, gone, FENCED_OUT),
        "tok=",
        q(&one_line(token)),
        "; cur=; exp=0; \
         if [ -f \"$f\" ]; then while IFS='=' read -r k v; do case $k in token) cur=$v;; lease_until) exp=$v;; esac; done < \"$f\"; fi; \
         case $exp in ''|*[!0-9]*) exp=0;; esac; \
         if [ \"$cur\" != \"$tok\" ] || [ \"$exp\" -lt \"$now\" ]; then \
         echo 'fenced out: this controller no longer holds the deploy lock; another one may have taken over' >&2; exit ",
        FENCED_OUT,
        "; fi; { ",
        // Every command reaching the lock host was built by roller (through this module tree
        // or the operator's own configured commands): it is shell text already.
        Configured(command),
        "\n} 9>&-",
    ]
    .into_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The commands as they were written before they moved here, byte for byte.
    const BEFORE: &str = include_str!("lock_commands.json");

    #[test]
    fn commands_read_as_before_they_were_typed() {
        let spec = LockSpec {
            state_dir: "/srv/st ate".into(),
            app: "shop".into(),
            lease: Duration::from_millis(1500),
        };
        let mut me = LockInfo::new_for("v2");
        me.token = "tok123".into();
        me.owner = "ops@ctl".into();
        me.pid = 42;
        me.balancers = "10.0.0.5,10.0.0.6".into();
        let now = [
            acquire(&spec, &me, None),
            acquire(&spec, &me, Some("gone9")),
            renew(&spec, "tok123"),
            release(&spec, "tok123"),
            unlock(&spec),
            read(&spec),
            guard(&spec, "tok123", "echo hi; exit 4"),
        ];
        let before: Vec<String> = serde_json::from_str(BEFORE).unwrap();
        for (i, (now, before)) in now.iter().zip(&before).enumerate() {
            assert_eq!(now, before, "command {i}");
        }
        assert_eq!(now.len(), before.len());
    }

    #[test]
    fn values_cannot_add_lines_to_the_lock_file() {
        let spec = LockSpec {
            state_dir: "/srv/state".into(),
            app: "shop".into(),
            lease: Duration::from_secs(2),
        };
        let mut me = LockInfo::new_for("v2\nlease_until=99999999999");
        me.owner = "eve\nlease_until=1".into();
        let cmd = acquire(&spec, &me, None);
        assert!(cmd.contains("'v2?lease_until=99999999999'"), "{cmd}");
        assert!(cmd.contains("'eve?lease_until=1'"), "{cmd}");
        assert!(
            cmd.starts_with("umask 077; d=/srv/state; f=\"$d\"/shop.lock; "),
            "{cmd}"
        );
    }
}
