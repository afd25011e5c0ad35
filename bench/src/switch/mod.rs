//! Switch benchmark (`bench-switch`): the nodeos software switch (userspace,
//! VXLAN between two node processes) against the same topology built from
//! Linux kernel parts (bridge + vxlan device), measured by the same tools
//! between the same kind of client namespaces.
//!
//! # Layout
//! - [`topo`]: the network namespaces of one side (two nodes joined by a
//!   veth "fabric", one client per node), named after this process and
//!   removed on drop; removal of namespaces left by a killed run.
//! - [`kernel`]: the peer: per node namespace a Linux bridge, a kernel vxlan
//!   device towards the other node, and a veth to the client namespace.
//! - [`ours`]: the nodeos side: two `nodeos node` processes, a security
//!   group, a network and one tap port per node, each tap moved into its
//!   client namespace.
//! - [`measure`]: iperf3 (TCP, 64-byte UDP) and ping between the two client
//!   namespaces, their parsers, and CPU time read from `/proc`.
//!
//! Nothing is created in the host namespace: both sides live in private
//! namespaces, so their addresses cannot collide with the host's or with
//! the tests' (`10.77.x.x`), and each side's namespaces are separate from
//! the other's (the kernel vxlan device and nodeos both want UDP 4789).
//! Every process runs under a [`crate::proc::ChildGuard`]; every namespace
//! is killed empty and deleted by its guard, also on failure and Ctrl-C.

pub mod kernel;
pub mod measure;
pub mod ours;
pub mod topo;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The two client namespaces' view of one side: who talks to whom.
#[derive(Debug, Clone)]
pub struct Ends {
    /// Which side ("linux" or "nodeos"), for logs and file names.
    pub side: &'static str,
    /// Node namespaces, by node index.
    pub nodes: [String; 2],
    /// Client namespaces, by node index.
    pub clients: [String; 2],
    /// The clients' addresses (no prefix length), by node index.
    pub ips: [String; 2],
}

/// Runs `prog ARGS`; its stdout, or an error carrying its stderr.
pub fn run(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{prog} {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS`.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

/// Runs `prog ARGS` inside namespace `ns` (through `ip netns exec`) with a
/// deadline and returns its output, whatever its exit status. The process
/// is killed when the deadline passes or the future is dropped.
pub async fn exec_in(ns: &str, prog: &str, args: &[&str], limit: Duration) -> anyhow::Result<Output> {
    let run = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, prog])
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let what = || format!("`{prog} {}` in {ns}", args.join(" "));
    tokio::time::timeout(limit, run)
        .await
        .with_context(|| format!("{} did not finish within {limit:?}", what()))?
        .with_context(what)
}

/// stdout and stderr of `out`, for messages.
pub fn text(out: &Output) -> String {
    let mut t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        if !t.is_empty() {
            t.push('\n');
        }
        t.push_str(err.trim());
    }
    t
}
