//! SSH transport over russh: one multiplexed, strictly host-key-checked connection per host.
