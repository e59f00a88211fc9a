//! Which sides of the fleet run their commands as root through sudo, as the plan records it:
//! the wrapper itself is applied as each command is sent (`transport::sudo`), so the lock's,
//! the state's and every step's commands go through it alike, and `roller plan` prints each
//! step's command the way it is sent.

use serde::Serialize;

use super::Role;
use crate::inventory::Inventory;
use crate::remote;

/// `app.sudo` and `balancer.sudo`: each command of that side runs as
/// `sudo -n /bin/sh -c '<command>'`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Sudo {
    pub app: bool,
    pub balancer: bool,
}

impl Sudo {
    pub fn of(inv: &Inventory) -> Sudo {
        Sudo {
            app: inv.app.sudo,
            balancer: inv.balancer.sudo,
        }
    }

    pub fn is_off(&self) -> bool {
        !self.app && !self.balancer
    }

    /// Whether commands of `role` go through sudo.
    pub fn on(&self, role: Role) -> bool {
        match role {
            Role::App => self.app,
            Role::Balancer => self.balancer,
            Role::Fleet => false,
        }
    }

    /// `command` as it is sent to a host of `role`.
    pub fn shown(&self, role: Role, command: &str) -> String {
        if self.on(role) {
            remote::sudo::wrap(command)
        } else {
            command.to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::balancer::Nginx;
    use crate::inventory::Strategy;
    use crate::plan::{BatchSize, Plan, PlanInput};

    /// The plan and its `--commands` listing.
    fn plan_and_listing(app: bool, balancer: bool) -> (Plan, String) {
        let text = format!(
            r#"
[ssh]
user = "deploy"
known_hosts = "/dev/null"
[app]
name = "shop"
dir = "/opt/shop"
restart = "systemctl restart shop"
port = 8080
sudo = {app}
[balancer]
hosts = ["lb-1"]
upstream_file = "/etc/nginx/conf.d/shop.conf"
sudo = {balancer}
[hooks]
before_drain = "quiesce"
after_healthy = "warm-up"
[canary]
hosts = 1
weights = [10]
access_log = "/var/log/nginx/shop-roller.log"
[[hosts]]
name = "web-1"
address = "10.0.1.1"
[[hosts]]
name = "web-2"
address = "10.0.1.2"
"#
        );
        let inv = Inventory::parse(&text).unwrap();
        let balancer = Nginx::new(&inv.balancer, &inv.app, &inv.hosts);
        let plan = Plan::build(PlanInput {
            inventory: &inv,
            balancer: &balancer,
            release: "v2".into(),
            artifact: None,
            batch: BatchSize::Hosts(1),
            observed: None,
            unfinished: &BTreeSet::new(),
            targets: None,
            strategy: Strategy::Canary,
            live_slot: None,
            pause: true,
            adopt: false,
            selected: None,
        })
        .unwrap();
        let mut listing = Vec::new();
        plan.write_commands(&balancer, &mut listing).unwrap();
        (plan, String::from_utf8(listing).unwrap())
    }

    fn plan(app: bool, balancer: bool) -> Plan {
        plan_and_listing(app, balancer).0
    }

    fn listing(app: bool, balancer: bool) -> String {
        plan_and_listing(app, balancer).1
    }

    /// The command lines of the rendered plan, each with the target of the step above it.
    fn commands(text: &str) -> Vec<(String, String)> {
        let mut target = String::new();
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(command) = line.strip_prefix("      $ ") {
                out.push((target.clone(), command.to_string()));
            } else if !line.starts_with("      ") {
                target = line.to_string();
            }
        }
        out
    }

    #[test]
    fn every_command_of_a_side_with_sudo_is_printed_as_sent() {
        let text = listing(true, true);
        let commands = commands(&text);
        assert!(commands.len() > 10, "{text}");
        for (step, command) in &commands {
            assert!(
                command.starts_with("sudo -n /bin/sh -c "),
                "{step}: {command}"
            );
        }
        assert!(text.contains("On app hosts (app.sudo = true)"), "{text}");
        assert!(
            text.contains("On load balancers (balancer.sudo = true)"),
            "{text}"
        );
        let restart = sudo_wrapped("systemctl restart shop");
        assert!(
            commands.iter().any(|(_, c)| *c == restart),
            "the operator's restart runs under the one wrapper: {text}"
        );
        // Hooks too, inside the same single wrapper as their prologue.
        for hook in ["; quiesce'", "; warm-up'"] {
            assert!(
                commands.iter().any(|(_, c)| c.ends_with(hook)),
                "{hook}: {text}"
            );
        }
    }

    fn sudo_wrapped(command: &str) -> String {
        remote::sudo::wrap(command)
    }

    #[test]
    fn only_the_side_that_says_so_goes_through_sudo() {
        let text = listing(false, true);
        let commands = commands(&text);
        // The command every pool change runs is listed once, before the steps.
        let on_lb = |step: &str| step.contains(" lb lb-1") || step.starts_with("Every pool change");
        assert!(commands.iter().any(|(s, _)| on_lb(s)), "{text}");
        assert!(commands.iter().any(|(s, _)| !on_lb(s)), "{text}");
        for (step, command) in &commands {
            assert_eq!(
                command.starts_with("sudo -n "),
                on_lb(step),
                "{step}: {command}"
            );
        }
        assert!(!text.contains("On app hosts"), "{text}");

        let (none, text) = plan_and_listing(false, false);
        assert!(!text.contains("sudo -n"));
        let json = serde_json::to_value(&none).unwrap();
        assert!(json.get("sudo").is_none(), "unchanged without sudo");
        let json = serde_json::to_value(plan(true, false)).unwrap();
        assert_eq!(
            json["sudo"],
            serde_json::json!({"app": true, "balancer": false})
        );
    }
}
