//! Placeholder; see the SSH helper.
