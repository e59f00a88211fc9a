//! A local fleet on loopback: real `sshd` per host, a real `nginx` in front, a real JVM app.
//!
//! roller's integration tests and `cargo xtask fleet`/`demo` share this code so that what the
//! tests prove is what a developer sees on their own machine.

pub mod sshd;
