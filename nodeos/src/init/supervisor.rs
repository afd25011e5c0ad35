//! PID 1's loop once the node is set up: it runs the node daemon as a child
//! process and keeps it running, reaps every zombie, keeps the network thread
//! alive, and turns the init signals into power-off or reboot.
//!
//! The daemon is `/proc/self/exe node --data-dir /var/lib/nodeos ...` with
//! `NODEOS_INIT=1` in its environment (so its API knows it may ask PID 1 to
//! power off). It starts once the management address is up and the pool name
//! and key are known; it is restarted after 1, 2, 4 ... 60 seconds when it
//! exits (the wait starts over after a run of a minute), and restarted at once
//! when the management address changes. Its VM workers are its own children;
//! when it dies they die with it (`PR_SET_PDEATHSIG`) and are reaped here.
//!
//! Signals, all blocked in every thread and taken with `sigtimedwait`:
//! SIGCHLD reaps; [`POWEROFF_SIGNAL`] (SIGUSR2) powers off; [`REBOOT_SIGNAL`]
//! (SIGTERM), and SIGINT (Ctrl-Alt-Del), reboot. These are the signals
//! busybox and sysvinit use, and what the daemon's API sends.
//! [`KEXEC_SIGNAL`] (SIGUSR1) reboots into the image a rolling upgrade
//! staged, by kexec.
//!
//! The loop wakes at least every [`TICK`]; a panic inside it is reported and
//! the loop goes on.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::SigmaskHow;
pub use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;
use tracing::{error, info, warn};

use super::Throttle;
use super::cmdline::InitConfig;
use super::disk::{DATA_MOUNT, DataDisk};
use super::net::{self, NetConfig, NetEvent};
use super::power::{self, Exit, Power};

/// Asks PID 1 to power off (the daemon's API sends it).
pub const POWEROFF_SIGNAL: Signal = Signal::SIGUSR2;
/// Asks PID 1 to reboot (the daemon's API sends it).
pub const REBOOT_SIGNAL: Signal = Signal::SIGTERM;
/// Asks PID 1 to reboot into the image the daemon staged for a rolling
/// upgrade (`<data>/upgrade/next.json`), by kexec.
pub const KEXEC_SIGNAL: Signal = Signal::SIGUSR1;
/// The environment variable that tells the daemon PID 1 started it.
pub const INIT_ENV: &str = "NODEOS_INIT";
/// The NBD port with `nodeos.nbd_public` (the daemon's default port, on loopback).
pub const NBD_PORT: u16 = 10809;
/// The API port the daemon listens on (its default `--listen`).
pub const API_PORT: u16 = 7700;
/// Longest sleep of the loop.
pub const TICK: Duration = Duration::from_millis(500);
const FIRST_RESTART: Duration = Duration::from_secs(1);
const MAX_RESTART: Duration = Duration::from_secs(60);
/// A daemon that ran this long restarts after [`FIRST_RESTART`] again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
const NET_RESTART: Duration = Duration::from_secs(5);
const BLOCKED_REPORT_EVERY: Duration = Duration::from_secs(300);
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
const DEBUG_LOG_FILTER: &str = "debug,h2=info,hyper=info,tower=info,sled=info,openraft=info";

/// The signals PID 1 takes; blocked before any thread starts so that every
/// thread (and no handler) leaves them to the loop.
pub fn init_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in
        [Signal::SIGCHLD, POWEROFF_SIGNAL, REBOOT_SIGNAL, Signal::SIGINT, Signal::SIGUSR1, Signal::SIGHUP]
    {
        s.add(sig);
    }
    s
}

/// Waits up to `timeout` for one of `set`.
pub fn wait_signal(set: &SigSet, timeout: Duration) -> Option<Signal> {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` is an initialised signal set and `ts` a valid timespec,
    // both borrowed for the duration of the call; a null info pointer is allowed.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    if n < 0 { None } else { Signal::try_from(n).ok() }
}

/// Makes `cmd`'s process start with no signal blocked: exec keeps the mask,
/// and std's `Command` does not clear it, so without this the daemon would
/// inherit PID 1's blocked init signals and never hear SIGTERM.
fn unblock_signals_in_child(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls only
    // sigprocmask, which is async-signal-safe, on that child alone.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
                .map_err(std::io::Error::from)
        });
    }
}

/// The daemon's command line (after the program name).
pub fn daemon_args(cfg: &InitConfig, key_file: &Path, iface: &str, addr: Ipv4Addr) -> Vec<String> {
    let mut a: Vec<String> = vec!["node".into(), "--data-dir".into(), DATA_MOUNT.into()];
    if let Some(p) = &cfg.pool {
        a.extend(["--pool".into(), p.clone()]);
    }
    a.extend(["--pool-key-file".into(), key_file.display().to_string()]);
    a.extend(["--advertise".into(), SocketAddr::from((addr, API_PORT)).to_string()]);
    a.extend(["--discovery-iface".into(), iface.to_owned()]);
    if let Some(n) = cfg.bootstrap_expect {
        a.extend(["--bootstrap-expect".into(), n.to_string()]);
    }
    if !cfg.seeds.is_empty() {
        a.extend(["--seeds".into(), cfg.seeds.join(",")]);
    }
    if let Some(h) = &cfg.image {
        a.extend(["--image-hash".into(), h.clone()]);
    }
    if cfg.nbd_public {
        a.extend(["--nbd-listen".into(), SocketAddr::from((addr, NBD_PORT)).to_string()]);
    }
    a
}

/// The next restart wait after a run of `ran`, given the current one.
pub fn next_backoff(current: Duration, ran: Duration) -> Duration {
    if ran >= HEALTHY_RUN { FIRST_RESTART } else { (current * 2).clamp(FIRST_RESTART, MAX_RESTART) }
}

#[derive(Debug)]
struct Daemon {
    pid: Pid,
    since: Instant,
    iface: String,
    addr: Ipv4Addr,
    /// Whether the API answered since the start.
    serving: bool,
    next_probe: Instant,
}

/// PID 1 after boot.
#[derive(Debug)]
pub struct Supervisor {
    cfg: InitConfig,
    signals: SigSet,
    /// The pool key file, when there is a key.
    key_file: Option<PathBuf>,
    /// Why the daemon cannot start at all, repeated every [`BLOCKED_REPORT_EVERY`].
    blocked: Option<String>,
    blocked_said: Throttle,
    data: DataDisk,
    net_cfg: NetConfig,
    net_tx: Sender<NetEvent>,
    net_rx: Receiver<NetEvent>,
    net_thread: Option<JoinHandle<()>>,
    net_restart_at: Option<Instant>,
    /// The management address in force.
    addr: Option<(String, Ipv4Addr)>,
    daemon: Option<Daemon>,
    /// A power-off or reboot was refused by the kernel after everything was
    /// stopped: the daemon must not come back on an unmounted data dir.
    halted: bool,
    restart_at: Instant,
    backoff: Duration,
}

impl Supervisor {
    pub fn new(
        cfg: InitConfig,
        signals: SigSet,
        key_file: Option<PathBuf>,
        data: DataDisk,
        net_cfg: NetConfig,
    ) -> Self {
        let blocked = match (&cfg.pool, &key_file) {
            (None, _) => Some(
                "no usable pool name (a bad one is reported above): set nodeos.pool= on the kernel command line (or pool= in the image's node.conf)",
            ),
            (_, None) => Some(
                "no usable pool key (a bad one is reported above): set nodeos.key= on the kernel command line (or key= in the image's node.conf), the same on every node",
            ),
            _ => None,
        };
        let (net_tx, net_rx) = channel();
        Supervisor {
            cfg,
            signals,
            key_file,
            blocked: blocked.map(str::to_owned),
            blocked_said: Throttle::new(BLOCKED_REPORT_EVERY),
            data,
            net_cfg,
            net_tx,
            net_rx,
            net_thread: None,
            net_restart_at: Some(Instant::now()),
            addr: None,
            daemon: None,
            halted: false,
            restart_at: Instant::now(),
            backoff: Duration::ZERO,
        }
    }

    /// Runs forever.
    pub fn run(mut self) -> ! {
        loop {
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if step.is_err() {
                error!("PID 1's loop panicked (reported above); carrying on");
                std::thread::sleep(TICK);
            }
        }
    }

    fn step(&mut self) {
        match wait_signal(&self.signals, TICK) {
            Some(s) if s == POWEROFF_SIGNAL => self.power(Power::Off, s),
            Some(s) if s == REBOOT_SIGNAL || s == Signal::SIGINT => self.power(Power::Reboot, s),
            Some(s) if s == KEXEC_SIGNAL => self.kexec(),
            _ => {}
        }
        if let Some(why) = &self.blocked
            && self.blocked_said.allow(Instant::now(), why)
        {
            error!("the node daemon will not start: {why}");
        }
        let exits = power::reap();
        self.exited(&exits);
        self.net_events();
        self.keep_net();
        self.keep_daemon();
        self.probe();
    }

    fn power(&mut self, how: Power, sig: Signal) {
        warn!(signal = %sig, "{} requested", how.verb());
        let pid = self.daemon.take().map(|d| d.pid);
        let e = power::shutdown(how, pid, &self.data);
        self.halted = true;
        error!(error = %e, "still running with the node stopped; ask again or cut the power");
    }

    /// Reboots into the staged image, if it loads; else the node runs on.
    fn kexec(&mut self) {
        use nodeos_compute::upgrade::{STAGE_DIR, STAGED_FILE, StagedBoot};
        let path = Path::new(DATA_MOUNT).join(STAGE_DIR).join(STAGED_FILE);
        let next =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display())).and_then(|b| {
                serde_json::from_slice::<StagedBoot>(&b).map_err(|e| format!("{}: {e}", path.display()))
            });
        let loaded = next.and_then(|n| power::load_kexec(&n).map(|()| n));
        match loaded {
            Ok(n) => {
                warn!(image = %n.image_hash, cmdline = %n.cmdline, "staged image loaded; rebooting into it");
                self.power(Power::Kexec, KEXEC_SIGNAL);
            }
            Err(e) => error!(error = %e, "cannot reboot into the staged image; the node runs on"),
        }
    }

    fn exited(&mut self, exits: &[Exit]) {
        for e in exits {
            let Some(d) = self.daemon.as_ref().filter(|d| d.pid == e.pid) else { continue };
            let ran = d.since.elapsed();
            self.backoff = next_backoff(self.backoff, ran);
            self.restart_at = Instant::now() + self.backoff;
            let how = match (e.code, e.signal) {
                (Some(c), _) => format!("exit code {c}"),
                (_, Some(s)) => format!("signal {s}"),
                _ => "unknown status".to_owned(),
            };
            error!(
                pid = e.pid.as_raw(),
                ran_s = ran.as_secs(),
                restart_in_s = self.backoff.as_secs(),
                "node daemon ended ({how}); restarting it"
            );
            self.daemon = None;
        }
    }

    fn net_events(&mut self) {
        while let Ok(ev) = self.net_rx.try_recv() {
            match ev {
                NetEvent::Up { iface, addr } => {
                    let moved = self.daemon.as_ref().is_some_and(|d| d.addr != addr || d.iface != iface);
                    self.addr = Some((iface, addr));
                    if moved && let Some(d) = self.daemon.take() {
                        warn!(old = %d.addr, new = %addr, "management address changed; restarting the node daemon");
                        let exits = power::stop_daemon(d.pid);
                        self.exited(&exits);
                        self.restart_at = Instant::now();
                    }
                }
                NetEvent::Down { iface, addr } => {
                    // The daemon keeps running: the same address usually comes back.
                    if self.addr.as_ref().is_some_and(|(i, a)| *i == iface && *a == addr) {
                        self.addr = None;
                    }
                }
            }
        }
    }

    fn keep_net(&mut self) {
        if let Some(t) = &self.net_thread {
            if !t.is_finished() {
                return;
            }
            if let Some(t) = self.net_thread.take()
                && t.join().is_err()
            {
                error!("the network thread panicked (reported above)");
            }
            self.net_restart_at = Some(Instant::now() + NET_RESTART);
        }
        let Some(at) = self.net_restart_at else { return };
        if Instant::now() < at {
            return;
        }
        match net::spawn(self.net_cfg.clone(), self.net_tx.clone()) {
            Ok(t) => {
                self.net_thread = Some(t);
                self.net_restart_at = None;
            }
            Err(e) => {
                error!(error = %e, "cannot start the network thread; retrying");
                self.net_restart_at = Some(Instant::now() + NET_RESTART);
            }
        }
    }

    fn keep_daemon(&mut self) {
        if self.daemon.is_some() || self.blocked.is_some() || self.halted || Instant::now() < self.restart_at
        {
            return;
        }
        let (Some((iface, addr)), Some(key_file)) = (&self.addr, &self.key_file) else { return };
        let args = daemon_args(&self.cfg, key_file, iface, *addr);
        let mut cmd = Command::new("/proc/self/exe");
        // NO_COLOR: escape codes are noise on a serial console and in its captures.
        cmd.arg0("nodeos").args(&args).env(INIT_ENV, "1").env("NO_COLOR", "1").stdin(Stdio::null());
        unblock_signals_in_child(&mut cmd);
        if self.cfg.debug {
            cmd.env("NODEOS_LOG", DEBUG_LOG_FILTER);
        }
        match cmd.spawn() {
            Ok(child) => {
                // The child is reaped by `power::reap`, never through `child`.
                let pid = Pid::from_raw(child.id() as i32);
                info!(pid = pid.as_raw(), advertise = %SocketAddr::from((*addr, API_PORT)), "node daemon started");
                self.daemon = Some(Daemon {
                    pid,
                    since: Instant::now(),
                    iface: iface.clone(),
                    addr: *addr,
                    serving: false,
                    next_probe: Instant::now() + PROBE_EVERY,
                });
            }
            Err(e) => {
                self.backoff = next_backoff(self.backoff, Duration::ZERO);
                self.restart_at = Instant::now() + self.backoff;
                error!(error = %e, retry_in_s = self.backoff.as_secs(), "cannot start the node daemon");
            }
        }
    }

    /// Says once per daemon start when its API accepts connections: the
    /// console line a boot test waits for.
    fn probe(&mut self) {
        let Some(d) = self.daemon.as_mut().filter(|d| !d.serving && Instant::now() >= d.next_probe) else {
            return;
        };
        d.next_probe = Instant::now() + PROBE_EVERY;
        let api = SocketAddr::from((d.addr, API_PORT));
        if TcpStream::connect_timeout(&api, PROBE_TIMEOUT).is_ok() {
            d.serving = true;
            info!(api = %api, iface = %d.iface, after_s = d.since.elapsed().as_secs(), "node serving");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::cmdline;

    #[test]
    fn the_daemon_command_line() {
        let (cfg, problems) = cmdline::parse(
            "nodeos.pool=lab nodeos.key=0123456789abcdef nodeos.bootstrap_expect=1 nodeos.seeds=a:1,b:2 nodeos.image=abc",
            None,
        );
        assert!(problems.is_empty());
        let args = daemon_args(&cfg, Path::new("/run/nodeos/pool.key"), "eth0", Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(
            args.join(" "),
            "node --data-dir /var/lib/nodeos --pool lab --pool-key-file /run/nodeos/pool.key \
             --advertise 10.0.0.5:7700 --discovery-iface eth0 --bootstrap-expect 1 --seeds a:1,b:2 --image-hash abc"
        );
        let (cfg, _) = cmdline::parse("nodeos.pool=lab", None);
        let args = daemon_args(&cfg, Path::new("/k"), "eth1", Ipv4Addr::new(10, 0, 0, 6));
        assert_eq!(
            args.join(" "),
            "node --data-dir /var/lib/nodeos --pool lab --pool-key-file /k --advertise 10.0.0.6:7700 --discovery-iface eth1"
        );
        let (cfg, _) = cmdline::parse("nodeos.pool=lab nodeos.nbd_public", None);
        let args = daemon_args(&cfg, Path::new("/k"), "eth1", Ipv4Addr::new(10, 0, 0, 6));
        assert!(args.join(" ").ends_with("--nbd-listen 10.0.0.6:10809"), "{args:?}");
    }

    /// The daemon's own parser takes what PID 1 passes.
    #[test]
    fn the_daemon_parser_accepts_it() {
        use clap::Parser;
        let (cfg, _) = cmdline::parse(
            "nodeos.pool=lab nodeos.bootstrap_expect=5 nodeos.seeds=a:1 nodeos.image=b3:ff nodeos.nbd_public",
            None,
        );
        let mut argv = vec!["nodeos".to_owned()];
        argv.extend(daemon_args(&cfg, Path::new("/k"), "eth0", Ipv4Addr::new(10, 0, 0, 5)));
        let args = crate::Args::try_parse_from(&argv).expect("parses");
        let crate::Cmd::Node(n) = args.cmd else { panic!("not the node command") };
        assert!(n.action.is_none());
        assert_eq!(n.daemon.pool.as_deref(), Some("lab"));
        assert_eq!(n.daemon.bootstrap_expect, 5);
        assert_eq!(n.daemon.advertise, Some("10.0.0.5:7700".parse().expect("addr")));
        assert_eq!(n.daemon.discovery_iface.as_deref(), Some("eth0"));
        assert_eq!(n.daemon.image_hash.as_deref(), Some("b3:ff"));
    }

    #[test]
    fn restart_backoff() {
        let mut b = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..9 {
            b = next_backoff(b, Duration::from_secs(2));
            seen.push(b.as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(next_backoff(Duration::from_secs(60), HEALTHY_RUN), FIRST_RESTART);
    }

    #[test]
    fn signals_arrive_through_sigtimedwait() {
        // Block SIGUSR1 in this thread only and raise it at this thread:
        // the loop's way of taking signals, without touching the process.
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR1);
        set.thread_block().expect("block");
        assert_eq!(wait_signal(&set, Duration::from_millis(10)), None);
        // raise(3) signals the calling thread.
        nix::sys::signal::raise(Signal::SIGUSR1).expect("raise");
        assert_eq!(wait_signal(&set, Duration::from_secs(1)), Some(Signal::SIGUSR1));
        set.thread_unblock().expect("unblock");
    }

    /// The daemon gets the signals PID 1 blocks.
    #[test]
    fn children_start_with_no_blocked_signals() {
        let set = init_signals();
        let out = std::thread::spawn(move || {
            set.thread_block().expect("block");
            let mut cmd = Command::new("grep");
            cmd.args(["SigBlk", "/proc/self/status"]);
            unblock_signals_in_child(&mut cmd);
            cmd.output()
        })
        .join()
        .expect("thread");
        let Ok(out) = out else {
            nodeos_types::testing::skip("supervisor child sees its environment", "no grep");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("0000000000000000"), "{text}");
    }
}
