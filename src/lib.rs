//! portcullis: a RESP proxy that protects Redis. It forwards clients' commands to Redis,
//! refuses the ones that would let a client take the server over, and (as it grows) sends
//! writes only to a confirmed master.
//!
//! `run` takes already-bound listeners and a shutdown token, so tests bind
//! `127.0.0.1:0` and drive it in-process; `main.rs` only wires flags, logging and signals.
// `deny`, not `forbid`: `uring` (batched sends) allows it for its one submission call,
// measured in the README's performance section.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod catalog;
pub mod cli;
pub mod cluster;
pub mod command;
pub mod config;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod protocol;
pub mod runtime;
pub mod server;
pub mod session;
pub mod tls;
pub mod uring;

pub use config::Config;
pub use server::{run, Control, ReloadRequest, RunError};
