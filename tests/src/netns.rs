//! [`TestNet`]: one test's private L2 network.
//!
//! A Linux bridge in the host namespace with address `10.77.<k>.254/24`, and
//! per node a network namespace joined to it by a veth pair (host end enslaved
//! to the bridge, namespace end named `eth0` with `10.77.<k>.<i>/24`, `lo` up).
//! Multicast snooping is off on the bridge so discovery beacons reach every port.
//!
//! Names are `nos<pid:6 hex><seq:2 hex><kind><index>` (kind `b` bridge, `h`
//! host veth, `n` namespace), at most 15 characters, unique per process and
//! per test, and tell the stale cleanup which process made them. `<k>` is
//! claimed with a lock file, so tests in parallel (in one or several processes)
//! never share a subnet. Everything is removed on drop, panics included.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};
use nix::fcntl::Flock;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::env;

const PREFIX: &str = "nos";
/// Sequence number reserved for the prerequisite probe.
const PROBE_SEQ: u32 = 0xff;

/// Runs `ip ARGS`; its stdout, or an error carrying its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `ip {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tag(seq: u32) -> String {
    format!("{PREFIX}{:06x}{:02x}", std::process::id() & 0xff_ffff, seq & 0xff)
}

/// Namespace name of the prerequisite probe.
pub fn probe_name() -> String {
    format!("{}n0", tag(PROBE_SEQ))
}

/// The creator pid encoded in a harness-made name, or `None` for foreign names.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let b = rest.as_bytes();
    if b.len() < 10 || !b[..8].iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    if !matches!(b[8], b'b' | b'h' | b'n') || !b[9..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    u32::from_str_radix(&rest[..6], 16).ok()
}

/// Names of all network namespaces.
pub fn list_netns() -> anyhow::Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Names of all links in the host namespace.
pub fn list_links() -> anyhow::Result<Vec<String>> {
    let v: serde_json::Value =
        serde_json::from_str(&ip(&["-j", "link", "show"])?).context("parsing `ip -j link show`")?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|l| l["ifname"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// Third octets of the `10.77.x.y` addresses present in the host namespace.
fn used_subnets() -> anyhow::Result<BTreeSet<u8>> {
    let v: serde_json::Value =
        serde_json::from_str(&ip(&["-j", "-4", "addr", "show"])?).context("parsing `ip -j addr show`")?;
    let mut used = BTreeSet::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) {
                let o = ip.octets();
                if o[0] == 10 && o[1] == 77 {
                    used.insert(o[2]);
                }
            }
        }
    }
    Ok(used)
}

/// Kills (SIGKILL, by pid) every process in a harness namespace. Only ever
/// called on namespaces this harness made, whose processes it started.
pub fn kill_all_in(ns: &str) {
    let Ok(out) = ip(&["netns", "pids", ns]) else { return };
    for pid in out.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// One node's place on the test network.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Network namespace the node runs in.
    pub ns: String,
    /// Host end of its veth pair (cut and heal act on it).
    pub host_veth: String,
    /// Its address (on `eth0` inside the namespace).
    pub ip: Ipv4Addr,
}

/// A bridge and per-node namespaces; all removed on drop.
#[derive(Debug)]
pub struct TestNet {
    tag: String,
    subnet: u8,
    bridge: String,
    slots: Vec<Slot>,
    /// Namespaces with no link to the bridge (for a test's own devices).
    bare: Vec<String>,
    _subnet_lock: Flock<File>,
}

impl TestNet {
    /// Claims a free `10.77.<k>.0/24` and creates the bridge.
    pub fn new() -> anyhow::Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) % PROBE_SEQ;
        let tag = tag(seq);
        let used = used_subnets()?;
        let start: u8 = rand::random_range(1..=250);
        let mut claimed = None;
        for k in (start..=250).chain(1..start) {
            if used.contains(&k) {
                continue;
            }
            if let Some(lock) = env::try_lock(&env::subnet_lock_path(k)?)? {
                claimed = Some((k, lock));
                break;
            }
        }
        let Some((subnet, lock)) = claimed else { bail!("no free 10.77.<k>.0/24 subnet (all 250 in use)") };
        let net = TestNet {
            bridge: format!("{tag}b0"),
            tag,
            subnet,
            slots: Vec::new(),
            bare: Vec::new(),
            _subnet_lock: lock,
        };
        // From here on, drop removes whatever exists.
        ip(&["link", "add", &net.bridge, "type", "bridge", "mcast_snooping", "0"])?;
        ip(&["addr", "add", &format!("{}/24", net.bridge_ip()), "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        Ok(net)
    }

    /// The bridge's name (in the host namespace).
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// A name for the test's own host-side link `i` (a QEMU tap): the
    /// stale-run cleanup recognises it.
    pub fn link_name(&self, i: usize) -> String {
        format!("{}h{}", self.tag, 100 + i)
    }

    /// The bridge's (host side) address.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 254)
    }

    /// Address slot `i` (0-based) has or will have.
    pub fn ip_of(&self, i: usize) -> Ipv4Addr {
        let host = u8::try_from(i + 1).unwrap_or(u8::MAX);
        Ipv4Addr::new(10, 77, self.subnet, host)
    }

    /// Creates the next slot's namespace and veth pair; returns its index.
    pub fn add_slot(&mut self) -> anyhow::Result<usize> {
        let i = self.slots.len();
        if i >= 200 {
            bail!("a test network holds at most 200 nodes");
        }
        let slot = Slot {
            ns: format!("{}n{i}", self.tag),
            host_veth: format!("{}h{i}", self.tag),
            ip: self.ip_of(i),
        };
        self.slots.push(slot.clone());
        let ns = slot.ns.as_str();
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", &slot.host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip(&["link", "set", &slot.host_veth, "master", &self.bridge])?;
        ip(&["link", "set", &slot.host_veth, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", slot.ip), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        Ok(i)
    }

    pub fn slot(&self, i: usize) -> anyhow::Result<&Slot> {
        self.slots.get(i).with_context(|| format!("no slot {i} on this test network"))
    }

    /// Creates a namespace with only `lo` up and no link to the bridge (a
    /// test moves its own devices in); removed on drop.
    pub fn add_bare_namespace(&mut self) -> anyhow::Result<String> {
        let j = self.bare.len();
        if j >= 99 {
            bail!("a test network holds at most 99 bare namespaces");
        }
        let ns = format!("{}n{}", self.tag, 100 + j);
        self.bare.push(ns.clone());
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Takes node `i` off the network (its veth's host end goes down).
    pub fn cut(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.slot(i)?.host_veth, "down"]).map(|_| ())
    }

    /// Puts node `i` back on the network.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        ip(&["link", "set", &self.slot(i)?.host_veth, "up"]).map(|_| ())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for s in &self.slots {
            // The nodes are stopped by their owners first; this only catches strays.
            kill_all_in(&s.ns);
            let _ = ip(&["link", "del", &s.host_veth]);
            if let Err(e) = ip(&["netns", "del", &s.ns]) {
                eprintln!("nodeos-tests: warning: removing namespace {}: {e:#}", s.ns);
            }
        }
        for ns in &self.bare {
            kill_all_in(ns);
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("nodeos-tests: warning: removing namespace {ns}: {e:#}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            eprintln!("nodeos-tests: warning: removing bridge {}: {e:#}", self.bridge);
        }
    }
}
