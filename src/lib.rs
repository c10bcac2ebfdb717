pub mod protocol;
pub mod ws;
