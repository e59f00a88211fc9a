//! Developer tasks: `cargo xtask fleet|demo|bench|ci`.
fn main() {}
