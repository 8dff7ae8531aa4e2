//! The agent service: scheduled backup jobs with a run history, webhooks and metrics
//! (docs/AGENT.md).

pub mod config;
pub mod daemon;
pub mod hooks;
pub mod hyperv;
pub mod metrics;
pub mod run;
pub mod schedule;
pub mod sources;
pub mod state;
pub mod webhook;
