//! `[discovery.ec2]`: where hosts come from when the inventory does not list them. Only the
//! settings are read here; asking the API waits until a command needs hosts, so that reading an
//! inventory stays pure.

use std::collections::BTreeMap;

use toml::{Table, Value};

use super::reader::Reader;
use crate::discovery::{AddressKind, Discovery, Ec2Config};

impl Reader {
    pub(super) fn discovery(&mut self, root: &Table) -> Option<Discovery> {
        let t = self.optional_section(root, "discovery")?;
        self.unknown_keys("discovery", t, &["ec2"]);
        let Some(ec2) = self.optional_section(t, "ec2") else {
            if !t.contains_key("ec2") {
                self.problem("discovery", "names no source: add [discovery.ec2]");
            }
            return None;
        };
        Some(Discovery::Ec2(self.ec2(ec2)))
    }

    fn ec2(&mut self, t: &Table) -> Ec2Config {
        let s = "discovery.ec2";
        self.unknown_keys(s, t, &["region", "filters", "address", "name_tag", "user"]);
        let region = self.optional_string(t, s, "region");
        if let Some(r) = &region
            && !r
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            self.problem(
                "discovery.ec2.region",
                format!("{r:?} is not a region name like \"eu-west-1\""),
            );
        }
        let address = match self.optional_string(t, s, "address") {
            None => AddressKind::PrivateIp,
            Some(a) => AddressKind::parse(&a).unwrap_or_else(|| {
                self.problem(
                    "discovery.ec2.address",
                    format!(
                        "{a:?} is not one of {}",
                        AddressKind::NAMES.map(|n| format!("{n:?}")).join(", ")
                    ),
                );
                AddressKind::PrivateIp
            }),
        };
        Ec2Config {
            region,
            filters: self.filters(t),
            address,
            name_tag: self.string(t, s, "name_tag", Some("Name")),
            user: self.optional_string(t, s, "user"),
        }
    }

    /// At least one filter: an empty set would match every instance in the account, and a
    /// rollout must never reach hosts nobody selected.
    fn filters(&mut self, t: &Table) -> BTreeMap<String, Vec<String>> {
        let key = "discovery.ec2.filters";
        let filters = match t.get("filters") {
            Some(Value::Table(f)) if !f.is_empty() => f,
            Some(Value::Table(_)) | None => {
                self.problem(
                    key,
                    "missing: give at least one DescribeInstances filter, like { \"tag:Role\" = \"shop\" }",
                );
                return BTreeMap::new();
            }
            Some(other) => {
                self.problem(key, format!("must be a table, got {}", other.type_str()));
                return BTreeMap::new();
            }
        };
        let mut out = BTreeMap::new();
        for (name, value) in filters {
            let path = format!("{key}.{name:?}");
            let values: Option<Vec<String>> = match value {
                Value::String(v) => Some(vec![v.clone()]),
                Value::Array(items) if !items.is_empty() => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => None,
            };
            match values {
                Some(v) if !name.trim().is_empty() && v.iter().all(|v| !v.is_empty()) => {
                    out.insert(name.clone(), v);
                }
                _ => self.problem(
                    path,
                    "must be a non-empty string or a list of them, under a filter name",
                ),
            }
        }
        out
    }
}
