//! roller: zero-downtime rollouts of a JVM service across a fleet over SSH.

pub mod transport;
