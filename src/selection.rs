//! Which hosts a command acts on, from `--hosts` and `--tag`: resolved against the inventory
//! once, so that a typo or a selection matching nothing is refused before anything is
//! contacted, instead of quietly acting on no host or on every host.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::inventory::Inventory;

/// `--hosts web-1,web-3` and `--tag az-a` as given; both empty selects every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Host names; each must be one of the inventory's.
    pub hosts: Vec<String>,
    /// A host carrying any of these tags matches.
    pub tags: Vec<String>,
}

impl Selection {
    pub fn is_all(&self) -> bool {
        self.hosts.is_empty() && self.tags.is_empty()
    }

    /// The flags as the operator gave them, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.hosts.is_empty() {
            parts.push(format!("--hosts {}", self.hosts.join(",")));
        }
        if !self.tags.is_empty() {
            parts.push(format!("--tag {}", self.tags.join(",")));
        }
        parts.join(" ")
    }

    /// The names of the selected hosts, `None` when no selection was given. With both flags a
    /// host must be named and carry one of the tags. A name the inventory does not know, or a
    /// selection that matches no host, is an error.
    pub fn resolve(&self, inv: &Inventory) -> Result<Option<BTreeSet<String>>> {
        if self.is_all() {
            return Ok(None);
        }
        let unknown: Vec<&str> = self
            .hosts
            .iter()
            .filter(|h| inv.host(h).is_none())
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Usage {
                flag: "--hosts".into(),
                message: format!(
                    "no host named {} in the inventory (hosts: {})",
                    unknown.join(", "),
                    inv.hosts
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        let selected: BTreeSet<String> = inv
            .hosts
            .iter()
            .filter(|h| self.hosts.is_empty() || self.hosts.contains(&h.name))
            .filter(|h| self.tags.is_empty() || h.tags.iter().any(|t| self.tags.contains(t)))
            .map(|h| h.name.clone())
            .collect();
        if selected.is_empty() {
            return Err(Error::Usage {
                flag: if self.tags.is_empty() {
                    "--hosts"
                } else {
                    "--tag"
                }
                .into(),
                message: format!("{} selects no host of the inventory", self.describe()),
            });
        }
        Ok(Some(selected))
    }

    /// For commands that act on what a rollout recorded (`resume`, `recover`) or on every host
    /// at once (`switch-back`): a selection would be ignored, so it is refused instead.
    pub fn refuse(&self, command: &str, why: &str) -> Result<()> {
        if self.is_all() {
            return Ok(());
        }
        Err(Error::Usage {
            flag: if self.hosts.is_empty() {
                "--tag"
            } else {
                "--hosts"
            }
            .into(),
            message: format!("`roller {command}` takes no host selection: {why}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        let text = crate::inventory::MINIMAL.to_string()
            + r#"
            [[hosts]]
            name = "web-1"
            address = "10.0.0.1"
            tags = ["az-a"]
            [[hosts]]
            name = "web-2"
            address = "10.0.0.2"
            tags = ["az-b"]
            [[hosts]]
            name = "web-3"
            address = "10.0.0.3"
            tags = ["az-a", "big"]
        "#;
        Inventory::parse(&text).expect("a valid inventory")
    }

    fn select(hosts: &[&str], tags: &[&str]) -> Result<Option<BTreeSet<String>>> {
        Selection {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            tags: tags.iter().map(|s| s.to_string()).collect(),
        }
        .resolve(&inventory())
    }

    fn names(set: &[&str]) -> Option<BTreeSet<String>> {
        Some(set.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn no_flag_selects_every_host() {
        assert_eq!(select(&[], &[]).unwrap(), None);
    }

    #[test]
    fn names_and_tags_select_and_narrow_each_other() {
        assert_eq!(
            select(&["web-1", "web-3"], &[]).unwrap(),
            names(&["web-1", "web-3"])
        );
        assert_eq!(select(&[], &["az-a"]).unwrap(), names(&["web-1", "web-3"]));
        assert_eq!(
            select(&[], &["big", "az-b"]).unwrap(),
            names(&["web-2", "web-3"])
        );
        assert_eq!(
            select(&["web-1", "web-2"], &["az-a"]).unwrap(),
            names(&["web-1"])
        );
    }

    #[test]
    fn an_unknown_name_or_an_empty_match_is_refused() {
        let err = select(&["web-9"], &[]).unwrap_err().to_string();
        assert!(err.contains("no host named web-9"), "{err}");
        let err = select(&[], &["az-z"]).unwrap_err().to_string();
        assert_eq!(err, "--tag: --tag az-z selects no host of the inventory");
        let err = select(&["web-2"], &["az-a"]).unwrap_err().to_string();
        assert!(err.contains("selects no host"), "{err}");
    }
}
