//! nodeos: one binary that is the node OS (PID 1), the node daemon and the
//! command line of a nodeos pool.
//!
//! # Layout
//! - `main.rs`: argument parsing and dispatch; as PID 1, straight to `init`.
//! - `init/`: PID 1 of the node image: mounts, modules, data disk, network,
//!   the node daemon as a supervised child, zombies, power-off and reboot.
//! - `node.rs`: the composition root of the node daemon: config → running subsystems.
//! - `datadir.rs`: the node's data dir: identity file, lock, layout.
//! - `cli/`: one file per command group, all clients of the gRPC API.

mod cli;
mod datadir;
mod init;
mod node;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "nodeos", version, about = "nodeos: a pool of identical servers, managed as one")]
struct Args {
    #[command(flatten)]
    global: cli::Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the node daemon (with flags), or list/show pool nodes (with a subcommand).
    Node(Box<cli::node::NodeCmd>),
    /// Pool status and events.
    #[command(subcommand)]
    Pool(cli::pool::PoolCmd),
    /// The operator's key space in the pool metadata store.
    #[command(subcommand)]
    Meta(cli::meta::MetaCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(cli::vm::VmCmd),
    /// Replicated block volumes, their snapshots and clones; image import.
    #[command(subcommand)]
    Volume(cli::volume::VolumeCmd),
    /// Guest kernels and initramfs images in the pool, for `vm create --kernel image:NAME`.
    #[command(subcommand)]
    Image(cli::image::ImageCmd),
    /// Tenant networks carried between nodes in VXLAN.
    #[command(subcommand)]
    Network(cli::network::NetworkCmd),
    /// Ports of tenant networks, with their switch counters.
    #[command(subcommand)]
    Port(cli::network::PortCmd),
    /// Security groups: allow rules applied to ports.
    #[command(subcommand)]
    SecurityGroup(cli::network::SecurityGroupCmd),
    /// Each node's software switch.
    #[command(subcommand)]
    Switch(cli::network::SwitchCmd),
    /// The pool boots new machines from its own image over PXE.
    #[command(subcommand)]
    Pxe(cli::pxe::PxeCmd),
    /// Credentials: the first admin (`bootstrap`, with the pool key), issuing, revoking.
    #[command(subcommand)]
    Auth(cli::auth::AuthCmd),
    /// The audit trail of calls that changed the pool.
    #[command(subcommand)]
    Audit(cli::auth::AuditCmd),
    /// Contexts of the config file: which pool, which credential, which endpoints.
    #[command(subcommand)]
    Config(cli::config::ConfigCmd),
    /// PID 1 of the node image; anywhere else, `--dry-run` checks a boot configuration.
    Init(init::InitArgs),
    /// The per-VM worker process; started by the node, never by hand.
    #[command(hide = true)]
    VmWorker {
        /// File descriptor of the control socket the node passed.
        #[arg(long)]
        control_fd: i32,
    },
}

fn main() -> ExitCode {
    // The kernel starts the image's /init without arguments: as PID 1 this
    // binary is the node OS, and never returns.
    if std::process::id() == 1 {
        init::main();
    }
    let args = Args::parse();
    if !matches!(&args.cmd, Cmd::Node(n) if n.action.is_none()) && !matches!(args.cmd, Cmd::VmWorker { .. }) {
        // A command piped into `head` should end quietly, like other Unix tools.
        // SAFETY: restoring the default disposition of SIGPIPE before any other
        // thread exists; no handler code is involved.
        let _ = unsafe {
            nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
        };
    }
    match args.cmd {
        Cmd::Node(n) => match n.action {
            None => node::main(n.daemon),
            Some(action) => cli::run(&args.global, |c| Box::pin(cli::node::run(c, action))),
        },
        Cmd::Pool(p) => cli::run(&p.global(&args.global), |c| Box::pin(cli::pool::run(c, p))),
        Cmd::Meta(m) => cli::run(&args.global, |c| Box::pin(cli::meta::run(c, m))),
        Cmd::Vm(v) => cli::run(&args.global, |c| Box::pin(cli::vm::run(c, v))),
        Cmd::Volume(v) => cli::run(&v.global(&args.global), |c| Box::pin(cli::volume::run(c, v))),
        Cmd::Image(i) => cli::run(&i.global(&args.global), |c| Box::pin(cli::image::run(c, i))),
        Cmd::Network(n) => cli::run(&args.global, |c| Box::pin(cli::network::run_network(c, n))),
        Cmd::Port(p) => cli::run(&args.global, |c| Box::pin(cli::network::run_port(c, p))),
        Cmd::SecurityGroup(g) => cli::run(&args.global, |c| Box::pin(cli::network::run_security_group(c, g))),
        Cmd::Switch(s) => cli::run(&args.global, |c| Box::pin(cli::network::run_switch(c, s))),
        Cmd::Pxe(p) => cli::run(&args.global, |c| Box::pin(cli::pxe::run(c, p))),
        Cmd::Auth(a @ cli::auth::AuthCmd::Bootstrap { .. }) => {
            cli::run_local(|| cli::auth::bootstrap(&args.global, a))
        }
        Cmd::Auth(a) => cli::run(&args.global, |c| Box::pin(cli::auth::run(c, a))),
        Cmd::Audit(a) => cli::run(&args.global, |c| Box::pin(cli::auth::run_audit(c, a))),
        Cmd::Config(c) => cli::run_local(|| async {
            cli::config::run(args.global.config.as_deref(), args.global.output, c)
        }),
        Cmd::Init(a) => init::cli(a),
        Cmd::VmWorker { control_fd } => nodeos_vmm::worker::main(control_fd),
    }
}
