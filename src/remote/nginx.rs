//! The shell commands of the Nginx driver: validate, install an upstream file and confirm
//! that the reload retired every old worker, and count what is still in flight to a batch.
//! `balancer.rs` decides what the file says; this is how it reaches nginx.

use super::{Configured, Sh, q, sh};
use crate::balancer::{APPLY_REJECTED, APPLY_UNCONFIRMED};
use crate::inventory::BalancerConfig;

/// How long a pool change waits for nginx's old workers to stop accepting, by the host's clock
/// (whole seconds, so 4 to 5), looking at its workers every `CONFIRM_POLL` seconds. nginx
/// swaps generations in about a tenth of a second; five seconds is for a load balancer that is
/// busy, and stays well below the lock's mutex wait, since on the lock host a pool change
/// holds that mutex while it runs.
pub const CONFIRM_WAIT_SECS: u32 = 5;
const CONFIRM_POLL: f64 = 0.02;

/// Shell text that sets `m` to the master's PID from `pid_file`, or prints why it cannot and
/// runs the caller's text up to its closing `}`: any process can own a stale PID, so the
/// process title must be nginx's master's.
fn master_check(config: &BalancerConfig) -> Sh {
    let pid = q(&config.pid_file);
    sh![
        "m=$(cat ",
        &pid,
        " 2>/dev/null); \
         case \"$(tr '\\0' ' ' < \"/proc/${m:-0}/cmdline\" 2>/dev/null)\" in \"nginx: master process\"*) ;; \
         *) printf 'no nginx master runs with the PID in %s (%s); check balancer.pid_file\\n' ",
        &pid,
        " \"${m:-no PID}\" >&2; \
         false ;; esac || { ",
    ]
}

/// Resolves the upstream file where it really lives (a symlink stays one), into `$f`.
fn upstream_file(config: &BalancerConfig) -> Sh {
    sh![
        "f=",
        q(&config.upstream_file),
        "; if [ -L \"$f\" ]; then r=$(readlink -f -- \"$f\") && [ -n \"$r\" ] && f=$r; fi; ",
    ]
}

/// See [`crate::balancer::Balancer::apply_command`].
///
/// A reload is applied only once nothing routes with the old pool: nginx starts a whole new
/// generation of workers, and only then tells the old ones to quit; until each old worker has
/// read that, it keeps accepting connections and sending them to the old pool. An old worker
/// calls itself "worker process is shutting down" from the moment it closes its listening
/// sockets, so the pool change holds once every worker from before the reload has exited or
/// says so, and as many new workers as there were old ones accept. Cache manager and loader
/// children are not workers and are left out. A reload that never reached nginx restores the
/// old file, so nothing is half-changed. The file is replaced where it really lives (a symlink
/// stays a symlink), by a rename from a temporary file of this command's own (`mktemp`, so two
/// writers never share one) in the same directory, made with `cp -p` so it keeps the mode and,
/// where allowed, the owner; the old file stays reachable through a hard link until the reload
/// is confirmed. Few processes: this runs at every pool change.
pub fn apply(config: &BalancerConfig) -> String {
    sh![
        upstream_file(config),
        "n=$(mktemp \"$f.roller-new.XXXXXX\") || exit 1; p=\"$n.prev\"; trap 'rm -f \"$n\" \"$p\"' EXIT; \
         if [ -e \"$f\" ]; then cp -p \"$f\" \"$n\" && ln -f \"$f\" \"$p\" || exit 1; else chmod 644 \"$n\"; fi; \
         cat > \"$n\" || exit 1; \
         mv -f \"$n\" \"$f\" || exit 1; \
         restore() { if [ -e \"$p\" ]; then mv -f \"$p\" \"$f\"; else rm -f \"$f\"; fi; }; ",
        master_check(config),
        "restore; exit ",
        APPLY_REJECTED,
        "; }; \
         accepting() { ps -o pid=,args= --ppid \"$m\" | sed -n 's/^ *\\([0-9][0-9]*\\) nginx: worker process$/\\1/p'; }; \
         old=\" $(echo $(accepting)) \"; want=$(echo $old | wc -w); [ \"$want\" -gt 0 ] || want=1; \
         if ! { ",
        Configured(&config.reload),
        "; }; then restore; \
         echo 'reload failed; the previous upstream file was restored' >&2; exit ",
        APPLY_REJECTED,
        "; fi; \
         end=$(( $(date +%s) + ",
        CONFIRM_WAIT_SECS,
        " )); \
         while :; do stale=; fresh=0; \
         for c in $(accepting); do case \"$old\" in *\" $c \"*) stale=\"$stale $c\" ;; *) fresh=$((fresh+1)) ;; esac; done; \
         [ -z \"$stale\" ] && [ $fresh -ge $want ] && exit 0; \
         [ \"$(date +%s)\" -ge \"$end\" ] && break; sleep ",
        CONFIRM_POLL,
        "; done; \
         if [ $fresh -eq 0 ] && [ \"$(echo $stale)\" = \"$(echo $old)\" ]; then restore; \
         echo \"nginx did not reload within ",
        CONFIRM_WAIT_SECS,
        "s: its workers ($(echo $old)) still run the previous configuration; check that balancer.reload signals the master in \"",
        q(&config.pid_file),
        "\"; the previous upstream file was restored\" >&2; exit ",
        APPLY_REJECTED,
        "; fi; \
         if [ -n \"$stale\" ]; then \
         echo \"nginx workers from before the reload ($(echo $stale)) still accept connections with the previous pool ",
        CONFIRM_WAIT_SECS,
        "s after it; set worker_shutdown_timeout in nginx.conf so that old workers cannot outlive a reload\" >&2; \
         else echo \"only $fresh of $want new nginx workers were running ",
        CONFIRM_WAIT_SECS,
        "s after the reload\" >&2; fi; \
         exit ",
        APPLY_UNCONFIRMED,
    ]
    .into_string()
}

/// See [`crate::balancer::Balancer::test_command`]: `balancer.test`, the master's PID, a
/// writable directory for the upstream file, and the file itself printed for pre-flight.
pub fn test(config: &BalancerConfig) -> String {
    sh![
        Configured(&config.test),
        " || exit 1; ",
        master_check(config),
        "exit 1; }; ",
        upstream_file(config),
        "d=$(dirname \"$f\"); test -w \"$d\" || { echo \"$d is not writable\" >&2; exit 1; }; \
         cat \"$f\" 2>/dev/null; exit 0",
    ]
    .into_string()
}

/// Prints the upstream file, changing nothing: `roller status` reads the pool from it.
pub fn show(config: &BalancerConfig) -> String {
    sh![upstream_file(config), "cat \"$f\""].into_string()
}

/// See [`crate::balancer::Balancer::in_flight_command`]; `sockets` are the batch's
/// `address:port` as nginx connects to them.
///
/// A worker from before a reload calls itself "shutting down" until its last request ends; the
/// master's PID is checked like at every pool change, and where it cannot be read the second
/// line is left out, so the caller falls back to a quiet window.
pub fn in_flight(config: &BalancerConfig, sockets: &[String]) -> String {
    let filter = sockets
        .iter()
        .map(|s| format!("dst {s}"))
        .collect::<Vec<_>>()
        .join(" or ");
    sh![
        "ss -Htn state established ",
        q(&format!("( {filter} )")),
        " | wc -l; m=$(cat ",
        q(&config.pid_file),
        " 2>/dev/null); \
         case \"$(tr '\\0' ' ' < \"/proc/${m:-0}/cmdline\" 2>/dev/null)\" in \"nginx: master process\"*) \
         ps -o args= --ppid \"$m\" | grep -c 'worker process is shutting down' || true ;; esac",
    ]
    .into_string()
}
