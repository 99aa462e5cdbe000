//! The key integration suites again, with every proxy on one thread with batched sends
//! through io_uring (`src/uring.rs`), as a one-CPU deployment runs: the suites' own test
//! binaries, run with `PORTCULLIS_TEST_IO_URING=1` (read by `tests/support`), so nothing
//! is copied and every assertion stays as written (`tests/support/suites.rs`).
//!
//! Skipped, with a line on stderr, where the kernel refuses io_uring (the suites have
//! already run with direct writes).

mod support;

fn run_suite(name: &str) {
    if let Err(e) = io_uring_here() {
        eprintln!("skipped: no io_uring here ({e})");
        return;
    }
    support::suites::run(name, &[], (support::URING_ENV, "1"), "io_uring mode");
}

/// Whether this kernel lets a thread set up batched sends.
fn io_uring_here() -> std::io::Result<()> {
    std::thread::spawn(portcullis::uring::enable_on_this_thread)
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("panicked")))
}

#[test]
fn fidelity_in_uring_mode() {
    run_suite("fidelity");
}

#[test]
fn fidelity_drain_in_uring_mode() {
    run_suite("fidelity_drain");
}

#[test]
fn wire_in_uring_mode() {
    run_suite("wire");
}

#[test]
fn hostile_in_uring_mode() {
    run_suite("hostile");
}

#[test]
fn stall_in_uring_mode() {
    run_suite("stall");
}

#[test]
fn failover_in_uring_mode() {
    run_suite("failover");
}

#[test]
fn multiplexing_in_uring_mode() {
    run_suite("multiplexing");
}

#[test]
fn differential_in_uring_mode() {
    run_suite("differential");
}

#[test]
fn compat_in_uring_mode() {
    run_suite("compat");
}
