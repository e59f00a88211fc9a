//! Reading TOML values one key at a time, collecting every problem with its key path instead of
//! stopping at the first: what lets `roller` report a whole inventory's mistakes in one run.

use std::collections::HashSet;
use std::time::Duration;

use toml::{Table, Value};

use super::{is_address, is_word};
use crate::error::Problem;

/// Collects problems while reading values, so that one pass reports them all.
#[derive(Default)]
pub(super) struct Reader {
    pub(super) problems: Vec<Problem>,
}

impl Reader {
    /// Problems in file order of sections; a missing or mistyped section is reported once,
    /// not once more for every key it would have held.
    pub(super) fn finish(self) -> Vec<Problem> {
        const ORDER: [&str; 5] = ["ssh", "app", "health", "balancer", "hosts"];
        let section_of = |key: &str| key.split(['.', '[']).next().unwrap_or_default().to_string();
        let broken: HashSet<String> = self
            .problems
            .iter()
            .filter(|p| !p.key.contains(['.', '[']) && p.key != "hosts")
            .map(|p| p.key.clone())
            .collect();
        let mut problems: Vec<Problem> = self
            .problems
            .into_iter()
            .filter(|p| !(p.key.contains('.') && broken.contains(&section_of(&p.key))))
            .collect();
        problems.sort_by_key(|p| {
            let section = section_of(&p.key);
            ORDER.iter().position(|s| *s == section).unwrap_or(0)
        });
        problems
    }

    pub(super) fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn unknown_keys(&mut self, section: &str, table: &Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let path = join(section, key);
                self.problem(
                    path,
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
    }

    pub(super) fn section<'t>(&mut self, root: &'t Table, name: &str) -> Option<&'t Table> {
        match root.get(name) {
            None => {
                self.problem(name, "missing section");
                None
            }
            Some(_) => self.optional_section(root, name),
        }
    }

    pub(super) fn optional_section<'t>(
        &mut self,
        root: &'t Table,
        name: &str,
    ) -> Option<&'t Table> {
        match root.get(name) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                self.problem(name, format!("must be a table, got {}", other.type_str()));
                None
            }
        }
    }

    pub(super) fn raw_string(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<&str>,
    ) -> Option<String> {
        let path = join(section, key);
        match t.get(key) {
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.problem(path, "must not be empty");
                None
            }
            Some(Value::String(s)) if s.contains(['\0', '\n', '\r']) => {
                self.problem(path, "must be a single line");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.problem(path, format!("must be a string, got {}", other.type_str()));
                None
            }
            None => match default {
                Some(d) => Some(d.to_string()),
                None => {
                    self.problem(path, "missing");
                    None
                }
            },
        }
    }

    pub(super) fn string(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<&str>,
    ) -> String {
        self.raw_string(t, section, key, default)
            .unwrap_or_default()
    }

    pub(super) fn optional_string(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
    ) -> Option<String> {
        t.get(key)?;
        self.raw_string(t, section, key, None)
    }

    pub(super) fn word(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<&str>,
    ) -> String {
        let value = self.raw_string(t, section, key, default);
        match value {
            Some(v) if !is_word(&v) => {
                self.problem(
                    join(section, key),
                    format!("{v:?} may only contain letters, digits, '.', '_' and '-'"),
                );
                String::new()
            }
            v => v.unwrap_or_default(),
        }
    }

    pub(super) fn integer(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<i64>,
        min: i64,
        max: i64,
    ) -> i64 {
        let path = join(section, key);
        let value = match t.get(key) {
            Some(Value::Integer(i)) => *i,
            Some(other) => {
                self.problem(
                    path,
                    format!("must be an integer, got {}", other.type_str()),
                );
                return default.unwrap_or(min);
            }
            None => match default {
                Some(d) => d,
                None => {
                    self.problem(path, "missing");
                    return min;
                }
            },
        };
        if value < min || value > max {
            self.problem(
                path,
                format!("must be between {min} and {max}, got {value}"),
            );
            return min;
        }
        value
    }

    pub(super) fn port(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<i64>,
    ) -> u16 {
        self.integer(t, section, key, default, 1, 65535) as u16
    }

    pub(super) fn duration(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: Option<&str>,
    ) -> Duration {
        let Some(text) = self.raw_string(t, section, key, default) else {
            return Duration::ZERO;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.problem(join(section, key), "must be greater than zero");
                Duration::ZERO
            }
            Ok(d) => d,
            Err(_) => {
                self.problem(
                    join(section, key),
                    format!("{text:?} is not a duration like \"500ms\", \"10s\" or \"2m\""),
                );
                Duration::ZERO
            }
        }
    }
}

impl Reader {
    pub(super) fn address_list(&mut self, t: &Table, section: &str, key: &str) -> Vec<String> {
        let path = join(section, key);
        let Some(value) = t.get(key) else {
            self.problem(path, "missing: list every nginx host in front of the app");
            return Vec::new();
        };
        let Value::Array(items) = value else {
            self.problem(
                path,
                format!("must be a list of addresses, got {}", value.type_str()),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.problem(path.clone(), "must name at least one load-balancer host");
        }
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            match item {
                Value::String(s) if !is_address(s) => {
                    self.problem(item_path, format!("{s:?} is not a host name or IP address"))
                }
                Value::String(s) if !seen.insert(s.clone()) => {
                    self.problem(item_path, format!("duplicate {s:?}"))
                }
                Value::String(s) => out.push(s.clone()),
                other => self.problem(
                    item_path,
                    format!("must be a string, got {}", other.type_str()),
                ),
            }
        }
        out
    }

    /// An optional whole number from `min` up, for nginx parameters.
    pub(super) fn optional_count(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        min: i64,
    ) -> Option<u32> {
        t.get(key)?;
        Some(self.integer(t, section, key, None, min, 1_000_000) as u32)
    }

    pub(super) fn flag(&mut self, t: &Table, section: &str, key: &str) -> bool {
        match t.get(key) {
            None => false,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    join(section, key),
                    format!("must be true or false, got {}", other.type_str()),
                );
                false
            }
        }
    }

    /// A duration in nginx's own syntax (`10s`, `500ms`, `1m`), written as given.
    pub(super) fn nginx_time(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        let text = self.optional_string(t, section, key)?;
        let valid = text
            .strip_suffix("ms")
            .or_else(|| text.strip_suffix(['s', 'm', 'h']))
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !valid {
            self.problem(
                join(section, key),
                format!("{text:?} is not an nginx time like \"500ms\", \"10s\" or \"1m\""),
            );
            return None;
        }
        Some(text)
    }
}

pub(super) fn join(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}
