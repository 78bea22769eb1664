//! The gridforge coordinator engine: the grid view (nodes, VMs, operations) kept in an embedded store or etcd,
//! placement, operations pushed to the node agents as idempotent jobs, and the status poller. The daemon
//! (`gridforge-coordinator`) and the CLI (`gridctl`) are thin front ends over this library.

pub mod agents;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod grid;
pub mod ha;
pub mod http;
pub mod ops;
pub mod poller;
pub mod scaling;
pub mod scheduler;
pub mod store;

pub use gridforge_common::error_chain;
