//! The namespaces of one side: node namespaces N0 and N1 joined by a veth
//! pair (the "fabric", `eth0` at [`FABRIC_IPS`] in each), and client
//! namespaces C0 and C1, empty but for `lo` until a side wires them.
//!
//! Names are `bsw<pid:6 hex><side><role><index>` (side `k` kernel or `o`
//! ours, role `n` node or `c` client), so two runs never share a name and
//! [`remove_stale`] can tell which process made a namespace.

use std::time::Duration;

use super::ip;

/// Prefix of every namespace this benchmark makes.
const PREFIX: &str = "bsw";
/// The nodes' fabric addresses (a /24), by node index.
pub const FABRIC_IPS: [&str; 2] = ["10.88.0.1", "10.88.0.2"];

/// One network namespace; every process in it is killed and the namespace
/// deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with `lo` up.
    pub fn create(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name])?;
        // Owned from here on: a failure below still removes it.
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}

/// Kills (SIGKILL) whatever still runs in `ns`, then deletes it. Only ever
/// called on namespaces this benchmark made, whose processes it started.
fn remove(ns: &str) {
    for _ in 0..50 {
        let pids: Vec<i32> = ip(&["netns", "pids", ns])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = ip(&["netns", "del", ns]) {
        eprintln!("bench-switch: WARNING: cannot remove namespace {ns}: {e:#}");
    }
}

/// The pid encoded in a name this benchmark made, `None` for other names.
fn owner_pid(name: &str) -> Option<u32> {
    let hex = name.strip_prefix(PREFIX)?.get(..6)?;
    let rest = &name[PREFIX.len() + 6..];
    let b = rest.as_bytes();
    let shaped = b.len() == 3
        && matches!(b[0], b'k' | b'o' | b'p')
        && matches!(b[1], b'n' | b'c')
        && b[2].is_ascii_digit();
    if !shaped || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

fn tag() -> String {
    format!("{PREFIX}{:06x}", std::process::id() & 0xff_ffff)
}

/// The name of this process's namespace of `side` (`k`, `o`, or `p` for
/// the prerequisite probe), `role` (`n` or `c`) and index.
pub fn name(side: char, role: char, i: usize) -> String {
    format!("{}{side}{role}{i}", tag())
}

/// Removes the namespaces of earlier runs whose process is gone (a run
/// killed with SIGKILL runs no destructor); the names removed.
pub fn remove_stale() -> anyhow::Result<Vec<String>> {
    let listed = ip(&["netns", "list"])?;
    let mut removed = Vec::new();
    for ns in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = owner_pid(ns) else { continue };
        // Pids are compared on their low 24 bits: a live process that could
        // have made the name keeps it.
        let alive = std::fs::read_dir("/proc").map_or(true, |d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).any(|p| p & 0xff_ffff == pid)
        });
        if !alive {
            remove(ns);
            removed.push(ns.to_owned());
        }
    }
    Ok(removed)
}

/// One side's four namespaces, the fabric already up.
#[derive(Debug)]
pub struct Topology {
    /// N0, N1: where the switching happens.
    pub nodes: [Netns; 2],
    /// C0, C1: where the tools run.
    pub clients: [Netns; 2],
}

impl Topology {
    /// Creates side `side`'s namespaces and joins the node namespaces by a
    /// veth pair, `eth0` in each, with [`FABRIC_IPS`].
    pub fn new(side: char) -> anyhow::Result<Self> {
        let nodes = [Netns::create(name(side, 'n', 0))?, Netns::create(name(side, 'n', 1))?];
        let clients = [Netns::create(name(side, 'c', 0))?, Netns::create(name(side, 'c', 1))?];
        let (n0, n1) = (nodes[0].name(), nodes[1].name());
        ip(&["-n", n0, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", n1])?;
        for (ns, addr) in [n0, n1].into_iter().zip(FABRIC_IPS) {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(Topology { nodes, clients })
    }

    pub fn node(&self, i: usize) -> &str {
        self.nodes[i].name()
    }

    pub fn client(&self, i: usize) -> &str {
        self.clients[i].name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_of_this_shape_have_an_owner() {
        assert_eq!(owner_pid("bsw00a1b2kn0"), Some(0xa1b2));
        assert_eq!(owner_pid("bsw00a1b2oc1"), Some(0xa1b2));
        for other in ["bsw00a1b2", "bsw00a1b2xn0", "bsw00a1b2kn0x", "bswzzzzzzkn0", "nos00a1b200n0", "bsw"] {
            assert_eq!(owner_pid(other), None, "{other}");
        }
        assert_eq!(owner_pid(&name('k', 'n', 1)), Some(std::process::id() & 0xff_ffff));
    }
}
