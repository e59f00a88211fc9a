//! An in-memory transport for unit tests of the executor: scripted replies, recorded commands.
