#![no_main]
//! A connection's whole session from bytes: handshake, authentication,
//! frames and envelopes through the code the io_uring loop runs, with a
//! one-shard node's engine answering. Never panics, and every bound holds
//! after each step (see `corecast::internals::shard::fuzz_session`).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    corecast::internals::shard::fuzz_session(data);
});
