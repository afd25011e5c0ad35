//! PID 1: what `nodeos` does when the kernel starts it as `/init` of the
//! node image, then the supervisor that keeps the node daemon running.
//!
//! # Layout
//! - `mod.rs`: the boot sequence ([`main`]), the console, `nodeos init --dry-run`.
//! - `cmdline.rs`: `nodeos.*` kernel parameters and `/etc/nodeos/node.conf` → [`cmdline::InitConfig`].
//! - `mounts.rs`: proc, sysfs, devtmpfs, devpts, tmpfs on /dev/shm, /run and /tmp.
//! - `modules.rs`: kernel modules listed in `/lib/modules/<release>/load.order`.
//! - `disk.rs`: the data disk found by its ext4 label, mounted at `/var/lib/nodeos`; RAM without one.
//! - `net.rs`: the network thread: `lo`, the management link, a static address or DHCP (rtnetlink).
//! - `dhcp.rs`: the sans-IO DHCPv4 client state machine.
//! - `supervisor.rs`: the loop: the node daemon as a child process, zombie reaping, init signals.
//! - `power.rs`: orderly power-off and reboot.
//!
//! # Boot sequence
//! Block the init signals (before any thread exists) → mount the kernel file
//! systems → `/dev/console` as stdin, stdout and stderr if the kernel gave
//! none → read the configuration → log to the console → Ctrl-Alt-Del becomes
//! SIGINT, file limits raised → load modules → set the host name → mount the
//! data disk → write the pool key to `/run/nodeos/pool.key` (0600) → the
//! supervisor starts the network thread, and the daemon once the management
//! address is up.
//!
//! # Threads
//! The main thread runs the boot steps and then the supervisor loop; the
//! `nodeos-net` thread runs rtnetlink and the DHCP client on a current-thread
//! tokio runtime and reports addresses over a channel. Every step is guarded:
//! a panic or an error is reported on the console and the boot goes on (PID 1
//! must never exit: the kernel would panic).

pub mod cmdline;
pub mod dhcp;
pub mod disk;
pub mod modules;
pub mod mounts;
pub mod net;
pub mod power;
pub mod supervisor;

use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nodeos_types::auth::PoolKey;
use tracing::{error, info, warn};

use self::cmdline::{CONFIG_FILE, InitConfig, Secret};
use self::disk::DataDisk;
use self::net::NetConfig;
use self::supervisor::Supervisor;

/// Where PID 1 leaves the pool key for the daemon (tmpfs, mode 0600).
pub const KEY_FILE: &str = "/run/nodeos/pool.key";

/// The error and its causes, on one line.
pub use nodeos_types::error_chain as chain;

/// Lets a repeated console message through when it changed or once per period.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<(Instant, String)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None }
    }

    pub fn allow(&mut self, now: Instant, msg: &str) -> bool {
        let pass = match &self.last {
            Some((at, m)) => m != msg || now.duration_since(*at) >= self.every,
            None => true,
        };
        if pass {
            self.last = Some((now, msg.to_owned()));
        }
        pass
    }
}

/// Runs one boot step; a panic in it is reported, not fatal.
fn duty<T>(name: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(_) => {
            error!(step = name, "boot step panicked (reported above); going on without it");
            None
        }
    }
}

/// Makes `/dev/console` this process's stdin, stdout and stderr when the
/// kernel did not (it does when the image carries a /dev/console node; a
/// container or test harness may hand over other ones, which are kept).
fn attach_console() -> std::io::Result<()> {
    if (0..3).all(|fd| Path::new(&format!("/proc/self/fd/{fd}")).exists()) {
        return Ok(());
    }
    let console =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open("/dev/console")?;
    nix::unistd::dup2_stdin(&console)?;
    nix::unistd::dup2_stdout(&console)?;
    nix::unistd::dup2_stderr(&console)?;
    // With nothing open, the console itself got fd 0: it must stay open.
    if console.as_raw_fd() <= 2 {
        let _ = console.into_raw_fd();
    }
    Ok(())
}

fn init_logging(debug: bool) {
    let filter = if debug { "debug" } else { "info" };
    // A serial console shows escape codes as noise.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Raises the open file limit that the daemon and its VM workers inherit
/// (the kernel starts init with 1024).
fn raise_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, want, want) {
        // Without the right to raise the ceiling, at least reach it.
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0));
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
            info!(limit = hard, "open file limit raised to its ceiling");
        } else {
            warn!(error = %e, limit = soft, "open file limit not raised");
        }
    }
}

/// `nodeos-` and the last three bytes of a MAC written `aa:bb:cc:dd:ee:ff`.
pub fn hostname_from_mac(mac: &str) -> Option<String> {
    let bytes: Vec<&str> = mac.trim().split(':').collect();
    if bytes.len() != 6 || bytes.iter().any(|b| b.len() != 2 || !b.bytes().all(|c| c.is_ascii_hexdigit())) {
        return None;
    }
    Some(format!("nodeos-{}", bytes[3..].concat().to_ascii_lowercase()))
}

/// The host name from `nodeos.iface`'s MAC, or from the first ethernet
/// link's (lowest index), read from /sys/class/net.
fn default_hostname(iface: Option<&str>) -> String {
    let net = Path::new("/sys/class/net");
    let read = |name: &str, file: &str| std::fs::read_to_string(net.join(name).join(file)).ok();
    let mut links: Vec<(u32, String)> = std::fs::read_dir(net)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| iface.is_none_or(|i| i == n))
        .filter(|n| read(n, "type").is_some_and(|t| t.trim() == "1") && n != "lo")
        .filter_map(|n| Some((read(&n, "ifindex")?.trim().parse().ok()?, n)))
        .collect();
    links.sort();
    links
        .iter()
        .find_map(|(_, n)| hostname_from_mac(&read(n, "address")?))
        .unwrap_or_else(|| "nodeos".to_owned())
}

/// Writes the pool key where the daemon reads it.
fn write_key(secret: &Secret) -> std::io::Result<PathBuf> {
    let path = PathBuf::from(KEY_FILE);
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(secret.expose().as_bytes())?;
    Ok(path)
}

fn read_config_file(path: &Path) -> Result<Option<String>, std::io::Error> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn key_fingerprint(cfg: &InitConfig) -> String {
    cfg.key
        .as_ref()
        .and_then(|k| PoolKey::from_secret(k.expose().as_bytes()).ok())
        .map_or_else(|| "none".to_owned(), |k| k.fingerprint().to_string())
}

/// PID 1. Never returns: if the boot itself panics, a last-resort loop
/// still reaps zombies and serves power-off and reboot. (This relies on
/// panics unwinding: never build nodeos with `panic = "abort"`.)
pub fn main() -> ! {
    let signals = supervisor::init_signals();
    let booted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| boot(signals)));
    if booted.is_err() {
        error!(
            "nodeos init failed (reported above); the node daemon does not run; power-off and reboot still work"
        );
    }
    last_resort(&signals)
}

/// Reaps and waits for a power request, forever.
fn last_resort(signals: &supervisor::SigSet) -> ! {
    let data = if mounts::is_mount_point(Path::new(disk::DATA_MOUNT)) {
        DataDisk::Mounted { device: PathBuf::from("(data disk)") }
    } else {
        DataDisk::Ram
    };
    loop {
        let how = match supervisor::wait_signal(signals, supervisor::TICK) {
            Some(s) if s == supervisor::POWEROFF_SIGNAL => Some(power::Power::Off),
            Some(s) if s == supervisor::REBOOT_SIGNAL || s == supervisor::Signal::SIGINT => {
                Some(power::Power::Reboot)
            }
            _ => None,
        };
        if let Some(how) = how {
            power::shutdown(how, None, &data);
        }
        power::reap();
    }
}

fn boot(signals: supervisor::SigSet) -> ! {
    // First, while this is the only thread: every later thread inherits the mask.
    let mask = signals.thread_block();
    let mounted = mounts::mount_all();
    let console = attach_console();
    let cmdline_text = std::fs::read_to_string("/proc/cmdline");
    let file_text = read_config_file(Path::new(CONFIG_FILE));
    let (cfg, problems) = cmdline::parse(
        cmdline_text.as_deref().unwrap_or_default(),
        file_text.as_ref().ok().and_then(|t| t.as_deref()),
    );
    init_logging(cfg.debug);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    info!(version = env!("CARGO_PKG_VERSION"), kernel = release.trim(), "nodeos init starting as PID 1");
    if let Err(e) = mask {
        error!(error = %e, "cannot block the init signals; zombies and power requests may be missed");
    }
    for e in &mounted {
        error!(error = %chain(e), "mount failed");
    }
    if let Err(e) = console {
        // Logs still reach whatever the kernel gave as stderr.
        error!(error = %e, "cannot open /dev/console");
    }
    if let Err(e) = &cmdline_text {
        error!(error = %e, "cannot read /proc/cmdline; using the defaults");
    }
    if let Err(e) = &file_text {
        error!(error = %e, path = CONFIG_FILE, "cannot read the configuration file");
    }
    for p in &problems {
        warn!("{p}");
    }
    info!(
        pool = cfg.pool.as_deref().unwrap_or("none"),
        key = %key_fingerprint(&cfg),
        ip = ?cfg.ip,
        iface = cfg.iface.as_deref().unwrap_or("auto"),
        data = ?cfg.data,
        bootstrap_expect = ?cfg.bootstrap_expect,
        seeds = ?cfg.seeds,
        image = cfg.image.as_deref().unwrap_or("none"),
        "configuration"
    );
    // Ctrl-Alt-Del sends SIGINT to PID 1 (an orderly reboot) instead of an instant one.
    if let Err(e) = nix::sys::reboot::set_cad_enabled(false) {
        warn!(error = %e, "Ctrl-Alt-Del stays an instant reboot");
    }
    duty("file limit", raise_file_limit);
    duty("kernel modules", || {
        // Only the KVM module this CPU can use; without cpuinfo, both are tried.
        let kvm = std::fs::read_to_string(modules::CPUINFO).map(|t| modules::Kvm::of_cpuinfo(&t));
        if let Err(e) = &kvm {
            warn!(error = %e, path = modules::CPUINFO, "cannot read the CPU flags; trying every KVM module");
        }
        let skip = |name: &str| kvm.as_ref().is_ok_and(|k| k.skips(name));
        match modules::release_dir().and_then(|d| modules::load_all(&d, skip)) {
            Ok(r) => {
                for (name, e) in &r.failed {
                    if e.no_hardware() {
                        info!(module = %name, "module skipped: no such hardware");
                    } else {
                        warn!(module = %name, error = %chain(e), "module not loaded");
                    }
                }
                info!(
                    loaded = r.loaded.len(),
                    present = r.present.len(),
                    skipped = r.skipped.len(),
                    failed = r.failed.len(),
                    "kernel modules loaded"
                );
            }
            Err(e) => warn!(error = %chain(&e), "no kernel modules loaded"),
        }
        let Ok(kvm) = kvm else { return };
        match modules::kvm_status(kvm, Path::new(modules::SYS_MODULE)) {
            modules::KvmStatus::Ready { module, nested_paging } => {
                let nested_paging = match nested_paging {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "unknown",
                };
                info!(module, nested_paging, "KVM ready: this node can run VMs");
            }
            modules::KvmStatus::NotLoaded { module } => {
                warn!(
                    module,
                    "the CPU has hardware virtualization but its KVM module is not loaded: VMs cannot run on this node"
                )
            }
            modules::KvmStatus::Unsupported => {
                warn!(
                    "the CPU has no hardware virtualization (no vmx or svm flag): VMs cannot run on this node"
                )
            }
        }
    });
    let hostname = duty("host name", || {
        let name = cfg.hostname.clone().unwrap_or_else(|| default_hostname(cfg.iface.as_deref()));
        match nix::unistd::sethostname(&name) {
            Ok(()) => info!(hostname = %name, "host name set"),
            Err(e) => warn!(hostname = %name, error = %e, "host name not set"),
        }
        name
    })
    .unwrap_or_else(|| "nodeos".to_owned());
    duty("random pool", watch_entropy);
    let data = duty("data disk", || disk::prepare(&cfg.data)).unwrap_or(DataDisk::Ram);
    let key_file = cfg.key.as_ref().and_then(|k| {
        duty("pool key", || match write_key(k) {
            Ok(p) => Some(p),
            Err(e) => {
                error!(error = %e, path = KEY_FILE, "cannot write the pool key file");
                None
            }
        })
        .flatten()
    });
    let net = NetConfig {
        ip: cfg.ip.clone(),
        iface: cfg.iface.clone(),
        dns: cfg.dns.clone(),
        hostname,
        resolv_conf: PathBuf::from(net::RESOLV_CONF),
    };
    Supervisor::new(cfg, signals, key_file, data, net).run()
}

/// Whether the kernel's random pool can serve `getrandom()` without blocking.
fn crng_ready() -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: the buffer is valid for writes of its length for the whole call.
    let n = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), byte.len(), libc::GRND_NONBLOCK) };
    n == 1
}

/// The daemon's first `getrandom()` blocks until the kernel's random pool is ready, which on
/// a machine with no RDRAND and no hardware RNG can take minutes: say so on the console while
/// it lasts, instead of a node that looks hung.
fn watch_entropy() {
    if crng_ready() {
        return;
    }
    warn!(
        "THE KERNEL'S RANDOM POOL IS NOT READY: the node daemon waits for it before it starts. \
         Give the machine an entropy source (a CPU with RDRAND, a hardware RNG, QEMU's -device virtio-rng-pci)."
    );
    let started = Instant::now();
    let spawned = std::thread::Builder::new().name("entropy".into()).spawn(move || {
        while !crng_ready() {
            std::thread::sleep(Duration::from_secs(10));
            if !crng_ready() {
                warn!(
                    waited_s = started.elapsed().as_secs(),
                    "random pool still not ready; the node daemon waits"
                );
            }
        }
        info!(waited_s = started.elapsed().as_secs(), "random pool ready");
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot watch the random pool");
    }
}

/// `nodeos init`: outside PID 1, only `--dry-run`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Check a boot configuration and show what PID 1 would run; changes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Kernel command line to check (default: this machine's /proc/cmdline).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Configuration file to check (default: /etc/nodeos/node.conf, if it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `nodeos init --dry-run`: exit 0 when the configuration is complete and
/// clean, 1 when something was ignored or is missing, 2 on misuse.
pub fn cli(a: InitArgs) -> ExitCode {
    if !a.dry_run {
        eprintln!(
            "nodeos init: this runs only as PID 1 of the node image; use --dry-run to check a boot configuration"
        );
        return ExitCode::from(2);
    }
    let line = match a.cmdline {
        Some(l) => l,
        None => match std::fs::read_to_string("/proc/cmdline") {
            Ok(l) => l,
            Err(e) => {
                eprintln!("nodeos init: cannot read /proc/cmdline: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let path = a.config.unwrap_or_else(|| PathBuf::from(CONFIG_FILE));
    let file = match read_config_file(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nodeos init: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let (cfg, problems) = cmdline::parse(&line, file.as_deref());
    for p in &problems {
        println!("ignored: {p}");
    }
    println!("pool:             {}", cfg.pool.as_deref().unwrap_or("MISSING (nodeos.pool=)"));
    match &cfg.key {
        Some(_) => println!("key:              fingerprint {}", key_fingerprint(&cfg)),
        None => println!("key:              MISSING (nodeos.key=)"),
    }
    println!("ip:               {:?}", cfg.ip);
    println!("dns:              {:?}", cfg.dns);
    println!("iface:            {}", cfg.iface.as_deref().unwrap_or("first ethernet link with carrier"));
    println!("hostname:         {}", cfg.hostname.as_deref().unwrap_or("nodeos-<last 3 MAC bytes>"));
    println!("data:             {:?}", cfg.data);
    println!(
        "bootstrap_expect: {}",
        cfg.bootstrap_expect.map_or("daemon default".to_owned(), |n| n.to_string())
    );
    println!("seeds:            {:?}", cfg.seeds);
    println!("image:            {}", cfg.image.as_deref().unwrap_or("none"));
    println!("debug:            {}", cfg.debug);
    let complete = cfg.pool.is_some() && cfg.key.is_some();
    if complete {
        let args = supervisor::daemon_args(&cfg, Path::new(KEY_FILE), "<iface>", Ipv4Addr::UNSPECIFIED)
            .join(" ")
            .replace("0.0.0.0:", "<management address>:");
        println!("daemon:           nodeos {args}");
    } else {
        println!("daemon:           not started (pool name and key are required)");
    }
    if problems.is_empty() && complete { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_from_macs() {
        assert_eq!(hostname_from_mac("52:54:00:AB:cd:0f\n").as_deref(), Some("nodeos-abcd0f"));
        assert_eq!(hostname_from_mac("00:00:00:00:00"), None);
        assert_eq!(hostname_from_mac("zz:54:00:ab:cd:0f"), None);
        assert_eq!(hostname_from_mac(""), None);
    }

    #[test]
    fn throttle_repeats_only_changes_or_after_the_period() {
        let t0 = Instant::now();
        let mut t = Throttle::new(Duration::from_secs(30));
        assert!(t.allow(t0, "a"));
        assert!(!t.allow(t0 + Duration::from_secs(1), "a"));
        assert!(t.allow(t0 + Duration::from_secs(2), "b"));
        assert!(!t.allow(t0 + Duration::from_secs(31), "b"));
        assert!(t.allow(t0 + Duration::from_secs(32), "b"));
    }

    #[test]
    fn error_chains_on_one_line() {
        let e = modules::ModuleError::List("/x".into(), std::io::ErrorKind::NotFound.into());
        assert_eq!(chain(&e), "cannot read the module list /x: entity not found");
    }
}
