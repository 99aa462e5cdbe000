//! The key integration suites again, with every proxy in shared mode
//! (`routing.backend_connections = "shared"`): the suites' own test binaries, run with
//! `PORTCULLIS_TEST_BACKEND_CONNECTIONS=shared` (read by `tests/support`), so nothing is
//! copied and every assertion stays as written.
//!
//! The binaries are the ones cargo built next to this one (`cargo test` and
//! `cargo test --all-targets` build every suite before running any). A suite binary
//! older than the library fails the test instead of testing stale code: run
//! `cargo test --test NAME --no-run` first when running this file alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// One suite at a time: each runs its own tests in parallel already.
static SERIAL: Mutex<()> = Mutex::new(());

fn deps_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("deps dir").to_path_buf()
}

fn modified(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The newest file in `dir` named `<prefix>-<hash><suffix>`.
fn newest(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                return false;
            };
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
                return false;
            };
            let Some(hash) = rest.strip_suffix(suffix) else {
                return false;
            };
            hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .max_by_key(|p| modified(p))
}

fn run_suite(name: &str) {
    run_suite_skipping(name, &[]);
}

/// `run_suite`, without the tests named in `skip` (each with its reason at the call).
fn run_suite_skipping(name: &str, skip: &[&str]) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = deps_dir();
    let bin = newest(&dir, name, "").unwrap_or_else(|| {
        panic!("no test binary for `{name}` in {dir:?}: build it with `cargo test --test {name} --no-run`")
    });
    if let Some(lib) = newest(&dir, "libportcullis", ".rlib") {
        assert!(
            modified(&bin) >= modified(&lib),
            "{bin:?} is older than the library: rebuild it with `cargo test --test {name} --no-run`"
        );
    }
    let mut cmd = Command::new(&bin);
    for s in skip {
        cmd.args(["--skip", s]);
    }
    if !skip.is_empty() {
        cmd.arg("--exact");
    }
    let out = cmd
        .env("PORTCULLIS_TEST_BACKEND_CONNECTIONS", "shared")
        .output()
        .expect("run the suite");
    assert!(
        out.status.success(),
        "suite `{name}` failed in shared mode:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compat_in_shared_mode() {
    run_suite("compat");
}

#[test]
fn wire_in_shared_mode() {
    run_suite("wire");
}

#[test]
fn failover_in_shared_mode() {
    run_suite("failover");
}

#[test]
fn hostile_in_shared_mode() {
    run_suite("hostile");
}

#[test]
fn attacks_in_shared_mode() {
    run_suite("attacks");
}

#[test]
fn ops_in_shared_mode() {
    run_suite("ops");
}

#[test]
fn differential_in_shared_mode() {
    run_suite("differential");
}

#[test]
fn auth_in_shared_mode() {
    run_suite("auth");
}

#[test]
fn passthrough_in_shared_mode() {
    run_suite("passthrough");
}

#[test]
fn tls_in_shared_mode() {
    run_suite("tls");
}

#[test]
fn sentinel_in_shared_mode() {
    run_suite("sentinel");
}

#[test]
fn multiplexing_in_shared_mode() {
    run_suite("multiplexing");
}

#[test]
fn fidelity_in_shared_mode() {
    // Skipped: `client_reply_mode_is_carried` kills the backend connection whose id
    // `CLIENT ID` reported, to force a new link. `CLIENT ID` is answered on the session's
    // own link (connection commands pin), and in shared mode the session releases that
    // link when its next command (the SET) goes to a shared connection, so there is no
    // such connection left to kill. What it checks (CLIENT REPLY kept by the proxy) is
    // covered in shared mode by compat's `client_reply_off_skip_on` and failover's
    // `client_reply_off_session_follows_a_master_change`.
    run_suite_skipping("fidelity", &["client_reply_mode_is_carried"]);
}

#[test]
fn fidelity_drain_in_shared_mode() {
    run_suite("fidelity_drain");
}

#[test]
fn shadow_in_shared_mode() {
    run_suite("shadow");
}

#[test]
fn modules_in_shared_mode() {
    run_suite("modules");
}

#[test]
fn cluster_in_shared_mode() {
    run_suite("cluster");
}
