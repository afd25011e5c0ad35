//! What a pool test needs from the machine, and the loud skip when it is missing.
//!
//! [`require`] is the first line of every process-level test: it checks for root,
//! iproute2 and working network namespaces (printing `SKIPPED: <test>: <reason>`
//! to stderr and returning `None` when one is missing), finds the `nodeos`
//! binary (panicking with the fix when it is missing), takes this process's
//! owner lock and removes leftovers of earlier crashed runs once per process.
//!
//! Cross-process bookkeeping lives in [`LOCK_DIR`]: `pid-<pid>.lock` is held
//! (flock) by every live harness process for its whole life, so a leftover
//! whose creator's lock can be taken belongs to a dead run; `subnet-<k>.lock`
//! is held by the test network using `10.77.<k>.0/24`.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, bail};
use nix::fcntl::{Flock, FlockArg};

use crate::netns;

/// Directory of the harness's cross-process lock files.
pub const LOCK_DIR: &str = "/run/nodeos-tests";
/// Prefix of every test's temporary directory (followed by `<pid>-`).
pub const TMP_PREFIX: &str = "nodeos-tests-";

/// The node image `make image` built, with its manifest.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// `NODEOS_IMAGE_DIR`, else `target/image` of this checkout.
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
    /// The manifest's `image_hash`.
    pub hash: String,
}

/// The image under test. `make test` builds it (`make image`), so a missing file is a broken
/// setup and an error, not a reason to skip.
pub fn built_image() -> anyhow::Result<BuiltImage> {
    let dir = std::env::var_os("NODEOS_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image"));
    for f in ["vmlinuz", "initramfs.img", "manifest.json"] {
        anyhow::ensure!(dir.join(f).is_file(), "{} is missing: run `make image`", dir.join(f).display());
    }
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("manifest.json"))?)
        .with_context(|| format!("{}/manifest.json", dir.display()))?;
    let hash = manifest["image_hash"].as_str().context("the manifest has no image_hash")?.to_owned();
    Ok(BuiltImage { dir, manifest, hash })
}

/// What a test that may run needs: the binary under test.
#[derive(Debug, Clone)]
pub struct Env {
    /// The `nodeos` binary under test.
    pub bin: PathBuf,
}

/// Checks the machine for `test`. `Ok(None)`: the test must return at once (the
/// loud `SKIPPED` line is already printed). Errors are harness failures.
pub fn require(test: &str) -> anyhow::Result<Option<Env>> {
    if let Err(reason) = prerequisites() {
        nodeos_types::testing::skip(test, &reason);
        return Ok(None);
    }
    let bin = nodeos_bin();
    owner_lock()?;
    cleanup_stale_once();
    Ok(Some(Env { bin }))
}

/// The binary under test: `$NODEOS_BIN`, else the workspace's debug build.
///
/// # Panics
/// When the binary is missing: a pool test without its binary is a broken
/// setup, never a skip.
pub fn nodeos_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEOS_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "NODEOS_BIN={} does not exist: run `make build` (or `make test`, which builds nodeos and sets NODEOS_BIN)",
            p.display()
        );
        return p;
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/nodeos");
    assert!(
        p.is_file(),
        "the nodeos binary is not built ({} is missing): run `make build` first, or `make test`, which builds it and sets NODEOS_BIN",
        p.display()
    );
    p
}

/// Root, iproute2 and a network namespace that can be made and entered; the
/// reason to skip otherwise. Checked once per process.
fn prerequisites() -> Result<(), String> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let uid = nix::unistd::geteuid();
            if !uid.is_root() {
                return Err(format!(
                    "not root (euid {uid}); process-level pool tests put each node in its own network namespace: run them as root (sudo -E make test)"
                ));
            }
            match Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status() {
                Ok(s) if s.success() => {}
                Ok(s) => return Err(format!("`ip -V` failed ({s}); install iproute2")),
                Err(e) => return Err(format!("`ip` (iproute2) is not runnable: {e}; install iproute2")),
            }
            probe_netns()
        })
        .clone()
}

/// Makes, enters and removes one namespace named like the harness's own (so a
/// crash in between leaves nothing the stale cleanup would not recognise).
fn probe_netns() -> Result<(), String> {
    let name = netns::probe_name();
    let made = netns::ip(&["netns", "add", &name]);
    let entered = made.as_ref().ok().map(|_| netns::ip(&["netns", "exec", &name, "true"]));
    let _ = netns::ip(&["netns", "del", &name]);
    match (made, entered) {
        (Err(e), _) => Err(format!("cannot create a network namespace: {e:#}")),
        (Ok(_), Some(Err(e))) => Err(format!("cannot enter a network namespace: {e:#}")),
        _ => Ok(()),
    }
}

fn lock_dir() -> anyhow::Result<&'static Path> {
    let dir = Path::new(LOCK_DIR);
    fs::create_dir_all(dir).with_context(|| format!("creating {LOCK_DIR}"))?;
    Ok(dir)
}

/// Opens (creating) a lock file and tries to take it without waiting.
/// `Ok(None)`: another live process holds it.
pub fn try_lock(path: &Path) -> anyhow::Result<Option<Flock<File>>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => bail!("locking {}: {e}", path.display()),
    }
}

/// Path of the lock file guarding subnet `10.77.<k>.0/24`.
pub fn subnet_lock_path(k: u8) -> anyhow::Result<PathBuf> {
    Ok(lock_dir()?.join(format!("subnet-{k}.lock")))
}

/// Takes this process's owner lock (once; held until the process ends).
fn owner_lock() -> anyhow::Result<()> {
    static HELD: OnceLock<Flock<File>> = OnceLock::new();
    static TAKING: Mutex<()> = Mutex::new(());
    let _g = TAKING.lock().unwrap_or_else(|p| p.into_inner());
    if HELD.get().is_some() {
        return Ok(());
    }
    let path = lock_dir()?.join(format!("pid-{}.lock", std::process::id()));
    let Some(lock) = try_lock(&path)? else {
        bail!("{} is held by another process although it names this pid", path.display());
    };
    let _ = HELD.set(lock);
    Ok(())
}

/// Whether the harness process `pid` is gone: its owner lock is missing or free.
/// A stale lock file found free is removed.
fn harness_gone(pid: u32) -> bool {
    if pid == std::process::id() {
        return false;
    }
    let Ok(dir) = lock_dir() else { return false };
    let path = dir.join(format!("pid-{pid}.lock"));
    if !path.exists() {
        return true;
    }
    match try_lock(&path) {
        Ok(Some(lock)) => {
            let _ = fs::remove_file(&path);
            drop(lock);
            true
        }
        _ => false,
    }
}

/// Removes what crashed earlier runs left: namespaces (and the node processes
/// still in them), links and temporary directories named with the harness
/// prefix whose creating process is gone. Runs once per process; problems are
/// printed, never fatal.
fn cleanup_stale_once() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut pids_seen = std::collections::BTreeMap::<u32, bool>::new();
        let mut gone = |pid: u32| *pids_seen.entry(pid).or_insert_with(|| harness_gone(pid));
        // Node processes first, then links (a veth pair goes with its host end), then namespaces.
        let mut stale_ns = Vec::new();
        match netns::list_netns() {
            Ok(names) => {
                for ns in names {
                    if let Some(pid) = netns::owner_pid(&ns)
                        && gone(pid)
                    {
                        eprintln!("nodeos-tests: removing stale namespace {ns} (creator pid {pid} is gone)");
                        netns::kill_all_in(&ns);
                        stale_ns.push(ns);
                    }
                }
            }
            Err(e) => eprintln!("nodeos-tests: warning: cannot list namespaces: {e:#}"),
        }
        match netns::list_links() {
            Ok(names) => {
                for link in names {
                    if let Some(pid) = netns::owner_pid(&link)
                        && gone(pid)
                    {
                        eprintln!("nodeos-tests: removing stale link {link} (creator pid {pid} is gone)");
                        if let Err(e) = netns::ip(&["link", "del", &link]) {
                            eprintln!("nodeos-tests: warning: {e:#}");
                        }
                    }
                }
            }
            Err(e) => eprintln!("nodeos-tests: warning: cannot list links: {e:#}"),
        }
        for ns in stale_ns {
            if let Err(e) = netns::ip(&["netns", "del", &ns]) {
                eprintln!("nodeos-tests: warning: {e:#}");
            }
        }
        // Owner locks of dead processes (removed by `harness_gone`).
        if let Ok(entries) = fs::read_dir(LOCK_DIR) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix("pid-")
                    .and_then(|r| r.strip_suffix(".lock"))
                    .and_then(|p| p.parse().ok())
                {
                    gone(pid);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix(TMP_PREFIX)
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if gone(pid) {
                    eprintln!("nodeos-tests: removing stale directory {}", e.path().display());
                    if let Err(err) = fs::remove_dir_all(e.path()) {
                        eprintln!("nodeos-tests: warning: {}: {err}", e.path().display());
                    }
                }
            }
        }
    });
}
