pub mod engine;
pub mod metrics;
pub mod protocol;
pub mod ws;
