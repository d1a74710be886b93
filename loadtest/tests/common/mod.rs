//! Shared by the load tool's tests: reading the tool's JSON result, and
//! (the gateway's own test file, included) ports and nats-server.
#![allow(dead_code)]

#[path = "../../../tests/common/system.rs"]
pub mod system;
pub use system::free_port;

use serde_json::Value;

/// A headline figure of a run, by key; panics when it is missing.
pub fn figure(v: &Value, key: &str) -> f64 {
    v["figures"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["key"] == key))
        .and_then(|f| f["value"].as_f64())
        .unwrap_or_else(|| panic!("figure {key} missing in {v:#}"))
}

/// A counter of a run, by key; panics when it is missing.
pub fn stat(v: &Value, key: &str) -> u64 {
    v["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("stat {key} missing"))
}
