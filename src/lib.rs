//! portcullis: a RESP proxy that protects Redis.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod command;
pub mod protocol;
