//! The scripts an app host's operators would have written: `bin/restart` and `bin/stop` for
//! the single JVM, `bin/restart-slot` and `bin/stop-slot` for blue-green slots. roller runs
//! them over SSH from the host's directory, exactly as it runs a production host's.
//!
//! They live as shell files under `fleet/scripts/`, where they read (and can be checked) as
//! shell rather than as Rust strings; this module fills in what differs per host, written
//! `@NAME@` in the files.

use std::path::Path;

use crate::proc::shell_quote;

const RESTART: &str = include_str!("../scripts/restart.sh");
const STOP: &str = include_str!("../scripts/stop.sh");
const RESTART_SLOT: &str = include_str!("../scripts/restart-slot.sh");
const STOP_SLOT: &str = include_str!("../scripts/stop-slot.sh");
/// Argument check, paths and stopping a slot's JVM: what both slot scripts start with.
const SLOT_COMMON: &str = include_str!("../scripts/slot-common.sh");

/// What an app host runs: the demo JVM, or the light stand-in that speaks the same HTTP and
/// start-up contract for fleets of a hundred hosts on one machine.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Runtime<'a> {
    Jvm(&'a Path),
    /// python3 running `bin/light-app.py`.
    Light(&'a Path),
}

/// The light stand-in for the JVM service, installed as `bin/light-app.py` on light fleets.
pub(crate) const LIGHT_APP: &str = include_str!("../light/light-app.py");

/// `bin/restart`: (re)starts the host's single app on `port`.
pub(crate) fn restart(runtime: Runtime<'_>, address: &str, port: u16) -> String {
    let (binary, launch) = match runtime {
        Runtime::Jvm(java) => (
            java,
            "setsid nohup \"$runtime\" -Xmx64m -Xss512k -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData \\\n    \
             -Dserver.address=\"$address\" -Dserver.port=\"$port\" -Dsun.net.httpserver.nodelay=true \\\n    \
             -jar \"$here/shop/current/app.jar\" </dev/null >>app.log 2>&1 &\n",
        ),
        Runtime::Light(python) => (
            python,
            "setsid nohup \"$runtime\" \"$here/bin/light-app.py\" \"$address\" \"$port\" \\\n    \
             \"$here/shop/current/app.jar\" </dev/null >>app.log 2>&1 &\n",
        ),
    };
    fill(
        RESTART,
        &[
            ("RUNTIME", shell_quote(binary)),
            ("ADDRESS", shell_quote(address)),
            ("PORT", port.to_string()),
            ("LAUNCH", launch.to_string()),
        ],
    )
}

/// `bin/stop`: stops the single JVM, draining as a restart does; fine when it is not running.
pub(crate) fn stop() -> String {
    fill(STOP, &[])
}

/// `bin/restart-slot blue|green`: (re)starts one slot from its `current-<slot>` link.
pub(crate) fn restart_slot(java: &Path, address: &str, ports: (u16, u16)) -> String {
    fill(
        RESTART_SLOT,
        &[
            ("SLOT_COMMON", slot_common(ports)),
            ("JAVA", shell_quote(java)),
            ("ADDRESS", shell_quote(address)),
        ],
    )
}

/// `bin/stop-slot blue|green`: stops one slot; one not running is already stopped.
pub(crate) fn stop_slot(ports: (u16, u16)) -> String {
    fill(STOP_SLOT, &[("SLOT_COMMON", slot_common(ports))])
}

fn slot_common((blue, green): (u16, u16)) -> String {
    fill(
        SLOT_COMMON,
        &[
            ("BLUE_PORT", blue.to_string()),
            ("GREEN_PORT", green.to_string()),
        ],
    )
}

/// Replaces every `@NAME@` of `values`; the whole line `@NAME@` when the value is a block of
/// lines of its own. Panics on a placeholder left unfilled: a script with a literal `@JAVA@`
/// would fail on the host, far from the typo.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut text = template.to_string();
    for (name, value) in values {
        let placeholder = format!("@{name}@");
        assert!(
            text.contains(&placeholder),
            "no {placeholder} in the script"
        );
        let block = format!("{placeholder}\n");
        text = if value.ends_with('\n') && text.contains(&block) {
            text.replace(&block, value)
        } else {
            text.replace(&placeholder, value)
        };
    }
    let left =
        text.split('@').skip(1).step_by(2).find(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        });
    assert!(
        left.is_none(),
        "@{}@ left unfilled",
        left.unwrap_or_default()
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn all() -> Vec<(&'static str, String)> {
        let java = Path::new("/usr/lib/jvm/java 21/bin/java");
        vec![
            ("restart", restart(Runtime::Jvm(java), "127.1.2.11", 8080)),
            (
                "restart (light)",
                restart(
                    Runtime::Light(Path::new("/usr/bin/python3")),
                    "127.1.2.11",
                    8080,
                ),
            ),
            ("stop", stop()),
            (
                "restart-slot",
                restart_slot(java, "127.1.2.11", (8081, 8082)),
            ),
            ("stop-slot", stop_slot((8081, 8082))),
        ]
    }

    #[test]
    fn every_script_is_filled_in_and_parses_as_sh() {
        for (name, text) in all() {
            assert!(text.starts_with("#!/bin/sh\n"), "{name}:\n{text}");
            assert!(!text.contains("@"), "{name} kept a placeholder:\n{text}");
            let checked = Command::new("sh")
                .args(["-n", "-c", &text])
                .output()
                .unwrap();
            assert!(
                checked.status.success(),
                "{name} does not parse: {}\n{text}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }

    #[test]
    fn per_host_values_land_quoted_where_the_scripts_read_them() {
        let scripts = all();
        let restart = &scripts[0].1;
        assert!(
            restart.contains("\nruntime='/usr/lib/jvm/java 21/bin/java'\n"),
            "{restart}"
        );
        assert!(
            restart.contains("\naddress=127.1.2.11\nport=8080\n"),
            "{restart}"
        );
        assert!(
            restart.contains("-jar \"$here/shop/current/app.jar\""),
            "{restart}"
        );
        let light = &scripts[1].1;
        assert!(light.contains("\nruntime=/usr/bin/python3\n"), "{light}");
        assert!(
            light.contains("\"$here/bin/light-app.py\" \"$address\" \"$port\""),
            "{light}"
        );
        let restart_slot = &scripts[3].1;
        assert!(restart_slot.contains("    blue) port=8081 ;;\n    green) port=8082 ;;\n"));
        assert!(restart_slot.contains("\nstop_slot() {\n"), "{restart_slot}");
        assert!(scripts[4].1.contains("\nstop_slot() {\n"));
    }
}
