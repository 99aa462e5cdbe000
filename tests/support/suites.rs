//! Re-running a suite's own test binary with one environment variable set (read by
//! `tests/support`), so every assertion stays as written: `tests/shared_mode.rs` and
//! `tests/uring_mode.rs`.
//!
//! The binaries are the ones cargo built next to the caller's (`cargo test` and
//! `cargo test --all-targets` build every suite before running any). A suite binary
//! older than the library fails the test instead of testing stale code: run
//! `cargo test --test NAME --no-run` first when running a re-run file alone.

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

/// Run suite `name` with `var=value` set, without the tests named in `skip` (each with
/// its reason at the call); `mode` names the run in the failure message.
pub fn run(name: &str, skip: &[&str], (var, value): (&str, &str), mode: &str) {
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
    let out = cmd.env(var, value).output().expect("run the suite");
    assert!(
        out.status.success(),
        "suite `{name}` failed in {mode}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
