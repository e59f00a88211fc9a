//! Every shell command roller sends, and the one way to build them: [`Sh`], which only takes
//! shell text written in roller's own source (`&'static str`), values quoted for `sh`
//! ([`Quoted`]), numbers, and the commands the operator configured ([`Configured`]). A value
//! from the inventory, the command line or a host cannot reach a command unquoted: there is no
//! way to pass it as shell text.
//!
//! Building commands as data keeps `roller plan` honest (it prints these very strings) and lets
//! tests check them as text. `app` holds the commands run on app hosts, `nginx` those of the
//! Nginx load-balancer driver, `lock` the deploy lock's on the lock host, `state` the rollout
//! state's and the canary decision's there, `sudo` the wrapper that runs a side's commands as
//! root.

mod app;
pub mod health;
pub mod lock;
pub mod nginx;
pub mod state;
pub mod sudo;

pub use app::{
    artifact_present, hook, inspect, keep_old, log_since, log_size, mark_live, preflight, prune,
    prune_slots, read_decision, release_dir, releases_held, switch, switch_back, switch_link,
    upload,
};

/// Quotes one argument for POSIX `sh`. Inputs are validated single-line strings, so the only
/// failure (a NUL byte) cannot happen; we still refuse rather than emit something unquoted.
pub fn quote(arg: &str) -> String {
    shlex::try_quote(arg)
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| "''".to_string())
}

/// A value quoted as one `sh` word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted(String);

/// Quotes `value` as one `sh` word.
pub fn q(value: &str) -> Quoted {
    Quoted(quote(value))
}

/// A command the operator configured (`app.restart`, `balancer.reload`, a slot's start or
/// stop): shell text by definition, passed as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configured<'a>(pub &'a str);

/// A shell command under construction. See the module doc for what it accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sh(String);

impl Sh {
    pub fn push(&mut self, piece: impl Piece) {
        piece.push_to(&mut self.0);
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// What may go into an [`Sh`].
pub trait Piece {
    fn push_to(self, out: &mut String);
}

/// Shell text written in roller's source: only literals live that long.
impl Piece for &'static str {
    fn push_to(self, out: &mut String) {
        out.push_str(self);
    }
}

impl Piece for &Quoted {
    fn push_to(self, out: &mut String) {
        out.push_str(&self.0);
    }
}

impl Piece for Quoted {
    fn push_to(self, out: &mut String) {
        out.push_str(&self.0);
    }
}

impl Piece for Configured<'_> {
    fn push_to(self, out: &mut String) {
        out.push_str(self.0);
    }
}

/// A whole command built the same way, run as part of this one.
impl Piece for Sh {
    fn push_to(self, out: &mut String) {
        out.push_str(&self.0);
    }
}

impl Piece for &Sh {
    fn push_to(self, out: &mut String) {
        out.push_str(&self.0);
    }
}

macro_rules! number_pieces {
    ($($t:ty),*) => {$(
        impl Piece for $t {
            fn push_to(self, out: &mut String) {
                out.push_str(&self.to_string());
            }
        }
    )*};
}
number_pieces!(u16, u32, u64, usize, f64);

/// Builds a command from [`Piece`]s, in order: `sh!["cd ", q(dir), " || exit 1"]`.
macro_rules! sh {
    ($($piece:expr),* $(,)?) => {{
        let mut sh = $crate::remote::Sh::default();
        $( sh.push($piece); )*
        sh
    }};
}
pub(crate) use sh;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_go_in_quoted_and_literals_as_written() {
        let cmd = sh![
            "cd ",
            q("/opt/my shop; rm -rf /"),
            " && ",
            Configured("restart $x"),
            " ",
            3u32
        ];
        assert_eq!(
            cmd.into_string(),
            "cd '/opt/my shop; rm -rf /' && restart $x 3"
        );
    }
}
