pub mod auth;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod protocol;
pub mod ws;
