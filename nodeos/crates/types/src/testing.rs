//! The one way a test says it cannot run here.
//!
//! A test that needs something this machine lacks (root, `/dev/kvm`, a tool such
//! as `qemu-img`) calls [`skip`]: it prints `SKIPPED: <test>: <reason>` straight
//! to the process's stderr, where the test harness cannot swallow it, and the
//! test returns. In CI (`CI=true`, as `.ci/run` and most CI systems set it) the
//! machine is meant to have everything, so a skip there is a broken setup and
//! [`skip`] panics instead: a green CI never hides a test that did not run.

use std::io::Write;

/// Whether this run must not skip anything (`CI` is `true` or `1`).
pub fn skips_forbidden() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Says loudly that `test` does not run, and why.
///
/// # Panics
/// Under `CI=true`: there the skip is a failure of the machine's setup.
pub fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {reason}");
    assert!(
        !skips_forbidden(),
        "{test} cannot run: {reason}; under CI=true every test must run (scripts/test-deps.sh installs what tests need)"
    );
}
