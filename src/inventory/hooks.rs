//! `[hooks]`: the operator's own commands at fixed points of a run, on the hosts (around the
//! pool change and after health) and on the controller (around the rollout and its batches).
//! Shell text by definition, like `app.restart`; each bounded by `hooks.timeout`.

use std::time::Duration;

use serde::Serialize;
use toml::Table;

use super::reader::Reader;

/// Every hook is optional; none configured runs nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HooksConfig {
    /// On each host of a batch, before the pool change that takes the batch out.
    pub before_drain: Option<String>,
    /// On each host of a batch, once its health check passed; failing fails the batch.
    pub after_healthy: Option<String>,
    /// On the controller, before anything changes; failing stops the run.
    pub before_rollout: Option<String>,
    /// On the controller, after each batch that completed.
    pub after_batch: Option<String>,
    /// On the controller, once the run succeeded.
    pub after_rollout: Option<String>,
    /// On the controller, once the run ended any other way.
    pub on_failure: Option<String>,
    /// How long one hook may run.
    #[serde(with = "super::human")]
    pub timeout: Duration,
}

pub const DEFAULT_TIMEOUT: &str = "2m";

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            before_drain: None,
            after_healthy: None,
            before_rollout: None,
            after_batch: None,
            after_rollout: None,
            on_failure: None,
            timeout: humantime::parse_duration(DEFAULT_TIMEOUT).expect("a duration"),
        }
    }
}

const KEYS: &[&str] = &[
    "before_drain",
    "after_healthy",
    "before_rollout",
    "after_batch",
    "after_rollout",
    "on_failure",
    "timeout",
];

impl Reader {
    pub(super) fn hooks(&mut self, root: &Table) -> HooksConfig {
        let Some(t) = self.optional_section(root, "hooks") else {
            return HooksConfig::default();
        };
        self.unknown_keys("hooks", t, KEYS);
        let timeout = self.duration(t, "hooks", "timeout", Some(DEFAULT_TIMEOUT));
        let mut command = |key: &str| match t.get(key) {
            Some(_) => self.raw_string(t, "hooks", key, None),
            None => None,
        };
        HooksConfig {
            before_drain: command("before_drain"),
            after_healthy: command("after_healthy"),
            before_rollout: command("before_rollout"),
            after_batch: command("after_batch"),
            after_rollout: command("after_rollout"),
            on_failure: command("on_failure"),
            timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::inventory::{Inventory, MINIMAL};

    const HOST: &str = r#"
        [[hosts]]
        name = "web-1"
        address = "10.0.0.1"
    "#;

    #[test]
    fn hooks_are_optional_and_bounded_by_default() {
        let inv = Inventory::parse(&format!("{MINIMAL}{HOST}")).unwrap();
        assert_eq!(inv.hooks, super::HooksConfig::default());
        let inv = Inventory::parse(&format!(
            "{MINIMAL}{HOST}\n[hooks]\nafter_healthy = \"curl -fsS localhost:8080/warm\"\ntimeout = \"30s\"\n"
        ))
        .unwrap();
        assert_eq!(
            inv.hooks.after_healthy.as_deref(),
            Some("curl -fsS localhost:8080/warm")
        );
        assert_eq!(inv.hooks.timeout, std::time::Duration::from_secs(30));
    }

    #[test]
    fn every_bad_hook_key_is_named() {
        let problems = Inventory::parse(&format!(
            "{MINIMAL}{HOST}\n[hooks]\nbefore_drian = \"x\"\nafter_healthy = \"\"\nbefore_rollout = 3\ntimeout = \"soon\"\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "hooks.before_drian",
            "hooks.after_healthy",
            "hooks.before_rollout",
            "hooks.timeout",
        ] {
            assert!(keys.contains(&key), "{key} not in {problems:?}");
        }
    }
}
