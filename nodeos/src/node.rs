//! The node daemon's composition root: flags become a [`NodeConfig`], which
//! becomes running subsystems wired through their handles.
//!
//! Start order: data dir (identity, lock) → metadata store → listeners (API,
//! block replicas, NBD, VXLAN) → formation, replica server, NBD exports,
//! volume controllers, network agent, PXE agent, API. Stop order (SIGTERM/SIGINT): all of those, then raft.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use nodeos_api::ApiConfig;
use nodeos_api::auth::Signer;
use nodeos_auth::PoolCa;
use nodeos_auth::tls::TlsState;
use nodeos_block::replica::Replica;
use nodeos_block::store::ExtentStore;
use nodeos_block::store::device::DeviceStore;
use nodeos_block::store::file::FileStore;
use nodeos_block::transport::TcpTransport;
use nodeos_compute::Compute;
use nodeos_compute::ComputeConfig;
use nodeos_compute::process::ExecLauncher;
use nodeos_meta::network::PeerClient;
use nodeos_meta::{MetaConfig, MetaHandle};
use nodeos_network::{Agent, Networks};
use nodeos_pool::beacon::BEACON_PORT;
use nodeos_pool::formation::CapacityProbe;
use nodeos_pool::{Formation, FormationConfig};
use nodeos_pxe::agent::{PxeAgent, PxeAgentConfig, cmdline_safe_key};
use nodeos_pxe::source::ImageSource;
use nodeos_switch::switch::SwitchHandle;
use nodeos_types::NodeId;
use nodeos_types::auth::PoolKey;
use nodeos_volumes::exports::VolumeExports;
use nodeos_volumes::{Controller, ControllerConfig, Volumes};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::datadir::DataDir;

/// Flags of `nodeos node` when it runs the daemon.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Directory holding this node's identity and state (created on first start).
    #[arg(long, env = "NODEOS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Pool name; nodes only pool with nodes of the same name and key.
    #[arg(long, env = "NODEOS_POOL")]
    pub pool: Option<String>,
    /// File holding the pool key (at least 16 bytes), the same on every node.
    #[arg(long, env = "NODEOS_POOL_KEY_FILE")]
    pub pool_key_file: Option<PathBuf>,
    /// Address the gRPC server listens on.
    #[arg(long, default_value = "0.0.0.0:7700")]
    pub listen: SocketAddr,
    /// Address other nodes and clients reach this node at (default: --listen,
    /// or the discovery interface's address when --listen is a wildcard).
    #[arg(long)]
    pub advertise: Option<SocketAddr>,
    /// Other nodes' addresses to probe (host:port, comma separated).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Number of nodes to wait for before a new pool is initialised.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub bootstrap_expect: u16,
    /// Interface on which to send and hear multicast discovery beacons.
    #[arg(long)]
    pub discovery_iface: Option<String>,
    /// UDP port of the discovery beacons.
    #[arg(long, default_value_t = BEACON_PORT)]
    pub discovery_port: u16,
    /// Address the block replica server listens on (its port is advertised
    /// with --advertise's host when this is a wildcard).
    #[arg(long, default_value = "0.0.0.0:7800")]
    pub block_listen: SocketAddr,
    /// A raw block device (or file) for this node's volume copies instead
    /// of files under the data dir.
    #[arg(long)]
    pub block_device: Option<PathBuf>,
    /// Format --block-device if it holds no nodeos block store (a formatted
    /// one is never reformatted; without this flag an unformatted device is refused).
    #[arg(long, requires = "block_device")]
    pub format_block_device: bool,
    /// Address the NBD server exporting the pool's volumes listens on. NBD
    /// has no authentication: keep it on loopback or a trusted network.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Seconds a node may be unreachable before its volume copies are
    /// rebuilt on other nodes.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub rereplicate_after: u64,
    /// Seconds without a lease renewal after which a member counts as dead
    /// (suspect after a third of it, at least 3 s). Every member renews its
    /// lease once a second; give all members the same value.
    #[arg(long, env = "NODEOS_LEASE_TTL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=600))]
    pub lease_ttl: u64,
    /// Hours between scrubs of every volume copy's checksums.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
    pub scrub_every_hours: u64,
    /// Address the switch receives VXLAN tunnel traffic on (the port is
    /// advertised with --advertise's host when this is a wildcard). Linux
    /// vxlan devices use port 4789 by default.
    #[arg(long, default_value = "0.0.0.0:4789")]
    pub vxlan_listen: SocketAddr,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Hash of the node image this node booted, reported in its node record.
    #[arg(long)]
    pub image_hash: Option<String>,
    /// An image bundle directory (`make image`'s output) to serve over PXE when the pool's PXE
    /// settings say so. Nodes running the node image serve the image they run instead.
    #[arg(long)]
    pub pxe_bundle: Option<PathBuf>,
    /// Let VMs be made of files under DIR on this node (kernels, initramfs
    /// images, disk files given as paths). Off by default: VMs boot pool
    /// images and use volumes. Devices are never taken.
    #[arg(long, env = "NODEOS_HOST_IMAGES_DIR", value_name = "DIR")]
    pub host_images_dir: Option<PathBuf>,
    /// Development only: serve the API and peer port in plaintext, every
    /// caller an admin. Refused unless --listen and --advertise are loopback
    /// addresses. Without it the port speaks mutual TLS with the pool's CA.
    #[arg(long, env = "NODEOS_PLAINTEXT_LOOPBACK")]
    pub plaintext_loopback: bool,
}

/// A validated daemon configuration.
#[derive(Debug)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub pool: String,
    pub key: PoolKey,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub bootstrap_expect: usize,
    pub discovery_iface: Option<String>,
    pub discovery_port: u16,
    pub block_listen: SocketAddr,
    /// Raw device for volume copies (files under the data dir when none), and
    /// whether it may be formatted.
    pub block_device: Option<(PathBuf, bool)>,
    /// Where other nodes reach this node's replica server.
    pub block_advertise: SocketAddr,
    pub nbd_listen: SocketAddr,
    pub controller: ControllerConfig,
    /// When members without a lease renewal turn suspect, then dead.
    pub leases: nodeos_meta::LeasePolicy,
    pub vxlan_listen: SocketAddr,
    /// Where other nodes send this node's tunnel traffic.
    pub vxlan_advertise: SocketAddr,
    pub image_hash: String,
    /// Which host files VMs may be made of.
    pub host_paths: nodeos_compute::spec::HostPaths,
    /// The pool key's text when a kernel command line can carry it (for PXE-booted machines).
    pub key_text: Option<String>,
    pub pxe_source: ImageSource,
    /// Plaintext API on loopback (development), else mutual TLS.
    pub plaintext: bool,
}

/// Where the image served over PXE comes from: the image this node runs (its daemon is the
/// image PID 1's child and the image's identity file is in place), else `--pxe-bundle`.
fn pxe_source(bundle: Option<PathBuf>, image_hash: &str, data_dir: &std::path::Path) -> ImageSource {
    let root = std::path::Path::new("/");
    let under_image = nodeos_api::node::under_init() && root.join(nodeos_image::layout::IDENTITY).is_file();
    match bundle {
        Some(dir) => ImageSource::Bundle { dir },
        None if under_image => ImageSource::Running {
            root: root.to_owned(),
            booted_hash: image_hash.to_owned(),
            cache_dir: Some(data_dir.join("pxe")),
        },
        None => ImageSource::Unavailable(
            "this node does not run the node image; start it with --pxe-bundle DIR (`make image` output) to serve one"
                .into(),
        ),
    }
}

/// Pool names: what a hostname label allows.
fn valid_pool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

impl TryFrom<DaemonArgs> for NodeConfig {
    type Error = anyhow::Error;

    fn try_from(a: DaemonArgs) -> anyhow::Result<Self> {
        let Some(data_dir) = a.data_dir else { bail!("--data-dir is required to run a node") };
        let Some(pool) = a.pool else { bail!("--pool is required to run a node") };
        if !valid_pool_name(&pool) {
            bail!("--pool {pool:?} must be 1..=63 characters of a-z, 0-9 and '-', not starting with '-'");
        }
        let Some(key_file) = a.pool_key_file else { bail!("--pool-key-file is required to run a node") };
        let key = PoolKey::from_file(&key_file).context("--pool-key-file")?;
        let key_text = std::fs::read_to_string(&key_file).ok().and_then(|t| cmdline_safe_key(&t));
        for s in &a.seeds {
            if s.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                bail!("--seeds entry {s:?} is not host:port");
            }
        }
        let advertise = match (a.advertise, &a.discovery_iface) {
            (Some(adv), _) => adv,
            (None, _) if !a.listen.ip().is_unspecified() => a.listen,
            (None, Some(iface)) => {
                let ip = nodeos_pool::beacon::iface_ipv4(iface).with_context(|| {
                    format!("--advertise not given and --listen {} is a wildcard", a.listen)
                })?;
                SocketAddr::new(ip.into(), a.listen.port())
            }
            (None, None) => bail!(
                "--listen {} is a wildcard: give --advertise (the address other nodes reach this node at) or --discovery-iface",
                a.listen
            ),
        };
        if advertise.ip().is_unspecified() || advertise.port() == 0 {
            bail!("--advertise {advertise} must be a concrete address and port");
        }
        let block_advertise = if a.block_listen.ip().is_unspecified() {
            SocketAddr::new(advertise.ip(), a.block_listen.port())
        } else {
            a.block_listen
        };
        if block_advertise.port() == 0 {
            bail!("--block-listen {} needs a concrete port", a.block_listen);
        }
        let vxlan_advertise = if a.vxlan_listen.ip().is_unspecified() {
            SocketAddr::new(advertise.ip(), a.vxlan_listen.port())
        } else {
            a.vxlan_listen
        };
        if vxlan_advertise.port() == 0 {
            bail!("--vxlan-listen {} needs a concrete port", a.vxlan_listen);
        }
        if a.plaintext_loopback && !(a.listen.ip().is_loopback() && advertise.ip().is_loopback()) {
            bail!(
                "--plaintext-loopback is for a pool on one machine: --listen {} and --advertise {advertise} must be loopback addresses (without it the port speaks mutual TLS)",
                a.listen
            );
        }
        Ok(NodeConfig {
            plaintext: a.plaintext_loopback,
            pxe_source: pxe_source(a.pxe_bundle, a.image_hash.as_deref().unwrap_or_default(), &data_dir),
            key_text,
            image_hash: a.image_hash.unwrap_or_default(),
            host_paths: match a.host_images_dir {
                None => nodeos_compute::spec::HostPaths::Off,
                Some(dir) => {
                    let dir = std::fs::canonicalize(&dir)
                        .with_context(|| format!("--host-images-dir {}", dir.display()))?;
                    nodeos_compute::spec::HostPaths::Under(dir)
                }
            },
            vxlan_listen: a.vxlan_listen,
            vxlan_advertise,
            block_listen: a.block_listen,
            block_device: a.block_device.map(|d| (d, a.format_block_device)),
            block_advertise,
            nbd_listen: a.nbd_listen,
            controller: ControllerConfig {
                rereplicate_after: Duration::from_secs(a.rereplicate_after),
                scrub_every: Duration::from_secs(a.scrub_every_hours * 3600),
                ..ControllerConfig::default()
            },
            leases: nodeos_meta::LeasePolicy { ttl: Duration::from_secs(a.lease_ttl) },
            data_dir,
            pool,
            key,
            listen: a.listen,
            advertise,
            seeds: a.seeds,
            bootstrap_expect: a.bootstrap_expect.into(),
            discovery_iface: a.discovery_iface,
            discovery_port: a.discovery_port,
        })
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NODEOS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn")
    });
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// `nodeos node ...` without a subcommand.
pub fn main(args: DaemonArgs) -> ExitCode {
    init_logging(args.log_json);
    let cfg = match NodeConfig::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodeos node: {e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("nodeos").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeos node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, whatever the log filter says.
            eprintln!("nodeos node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// This node's memory, MiB (`MemTotal`), for VM placement; 0 if unreadable.
fn local_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// What KVM offers VMs on this node, for the pool's CPU baseline; `None`
/// without KVM (such a node runs no VMs, so it does not narrow the baseline).
fn local_cpu() -> Option<nodeos_types::cpu::CpuModel> {
    match nodeos_hv::Hypervisor::new() {
        Ok(hv) => {
            let model = nodeos_hv::cpu_model(hv.supported_cpuid());
            info!(vendor = %model.vendor, brand = %model.brand, "CPU recorded for the pool's baseline");
            Some(model)
        }
        Err(e) => {
            warn!(error = %e, "no KVM here: this node runs no VMs");
            None
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default()
}

/// Generation of the pool CA this node signs with.
const CA_GENERATION: u32 = nodeos_auth::ca::FIRST_GENERATION;

/// Mutual TLS for the API port: this node's certificate from the pool CA
/// (renewed in the background well before it expires); `None` when the
/// operator chose plaintext on loopback, said loudly.
fn api_tls(cfg: &NodeConfig, me: NodeId) -> anyhow::Result<Option<(TlsState, Signer)>> {
    if cfg.plaintext {
        tracing::warn!(
            listen = %cfg.listen,
            "PLAINTEXT API ON LOOPBACK: no TLS, no credentials, every local caller is an admin. For development only; never on a network"
        );
        return Ok(None);
    }
    let ca = Arc::new(PoolCa::derive(&cfg.key, CA_GENERATION).context("deriving the pool CA")?);
    let mut addrs = vec![cfg.advertise.ip()];
    if !cfg.listen.ip().is_unspecified() && cfg.listen.ip() != cfg.advertise.ip() {
        addrs.push(cfg.listen.ip());
    }
    let id = me.to_string();
    let cred = ca.issue_node(&id, &addrs).context("making this node's certificate")?;
    let trusted = ca.cert_pem().to_owned();
    let state = TlsState::new(&cred, &trusted).context("TLS configuration")?;
    info!(ca_generation = CA_GENERATION, addresses = ?addrs, "API port speaks mutual TLS with the pool CA");
    let renew = state.clone();
    let (renew_ca, renew_trusted) = (ca.clone(), trusted.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(nodeos_auth::ca::NODE_CERT_TTL / 3).await;
            match renew_ca
                .issue_node(&id, &addrs)
                .map_err(anyhow::Error::new)
                .and_then(|c| renew.set(&c, &renew_trusted).map_err(anyhow::Error::new))
            {
                Ok(()) => info!("node certificate renewed"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew this node's certificate; retrying at the next period")
                }
            }
        }
    });
    Ok(Some((state, Signer { ca, trusted_pem: trusted })))
}

/// Lifetime of a VM worker's credential (the replica protocol only).
const WORKER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Each VM worker gets its own credential (role worker) when it starts.
fn worker_tls_issuer(signer: Signer, me: NodeId) -> nodeos_compute::WorkerTlsIssuer {
    nodeos_compute::WorkerTlsIssuer(Arc::new(move |vm: &str| {
        match signer.ca.issue_worker(&me.to_string(), vm, WORKER_CERT_TTL) {
            Ok(c) => Some(nodeos_vmm::config::WorkerTls {
                cert_pem: c.cert_pem,
                key_pem: c.key_pem,
                ca_pem: signer.trusted_pem.clone(),
            }),
            Err(e) => {
                tracing::error!(vm, error = %e, "cannot make the VM worker's credential; its volumes will not open");
                None
            }
        }
    }))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let dir = DataDir::open(&cfg.data_dir, &cfg.pool)?;
    let me = dir.node_id;
    info!(node = %me, pool = %cfg.pool, key = %cfg.key.fingerprint(), data_dir = %dir.path.display(), "starting node");
    let tls = api_tls(&cfg, me)?;
    let peers = match &tls {
        Some((state, _)) => PeerClient::new(me, cfg.key.clone()).with_tls(state.connector()),
        None => PeerClient::new(me, cfg.key.clone()),
    };
    let meta_cfg = MetaConfig { leases: cfg.leases, ..MetaConfig::new(dir.meta_dir(), me, cfg.key.clone()) };
    let meta = MetaHandle::start(meta_cfg, peers).await.context("starting the metadata store")?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    info!(listen = %cfg.listen, advertise = %cfg.advertise, "API listening");
    let store: Arc<dyn ExtentStore> = match &cfg.block_device {
        Some((dev, format)) => {
            let s = DeviceStore::open(dev, *format).context("--block-device")?;
            info!(device = %dev.display(), "volume copies on a raw device");
            Arc::new(s)
        }
        None => {
            let store_dir = dir.path.join("blocks");
            Arc::new(
                FileStore::open(&store_dir)
                    .with_context(|| format!("cannot open the block store {}", store_dir.display()))?,
            )
        }
    };
    let block_listener = tokio::net::TcpListener::bind(cfg.block_listen)
        .await
        .with_context(|| format!("cannot listen for block replicas on {}", cfg.block_listen))?;
    let nbd_listener = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", cfg.nbd_listen))?;
    // Usage walks the store's files: asked at most once a minute.
    let probe_store = store.clone();
    let probed = std::sync::Mutex::new(None::<(std::time::Instant, u64)>);
    let capacity = CapacityProbe(Arc::new(move || {
        let mut last = probed.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some((at, bytes)) if at.elapsed() < Duration::from_secs(60) => bytes,
            _ => {
                let bytes = probe_store.usage().map(|u| u.used.saturating_add(u.free)).unwrap_or(0);
                *last = Some((std::time::Instant::now(), bytes));
                bytes
            }
        }
    }));
    let formation = Formation::new(
        FormationConfig {
            pool_name: cfg.pool.clone(),
            address: cfg.advertise.to_string(),
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            image_hash: cfg.image_hash.clone(),
            seeds: cfg.seeds.clone(),
            bootstrap_expect: cfg.bootstrap_expect,
            discovery_iface: cfg.discovery_iface.clone(),
            beacon_port: cfg.discovery_port,
            block_address: cfg.block_advertise.to_string(),
            vxlan_address: cfg.vxlan_advertise.to_string(),
            block_capacity: capacity,
            cpu: local_cpu(),
            memory_mib: local_memory_mib(),
        },
        meta.clone(),
    );
    let transport = match &tls {
        Some((state, _)) => TcpTransport::with_tls(cfg.key.clone(), state.connector()),
        None => TcpTransport::new(cfg.key.clone()),
    };
    let volumes = Volumes::new(meta.clone(), transport);
    let switch = SwitchHandle::start(cfg.vxlan_listen).await.context("starting the switch")?;
    let networks = Networks::new(meta.clone());
    let exe = std::env::current_exe().context("cannot find this binary to run VM workers")?;
    let compute = Compute::new(
        ComputeConfig {
            node_id: me,
            state_dir: dir.path.join("vms"),
            pool_key: cfg.key.clone(),
            migration_address: cfg.advertise.ip(),
            host_paths: cfg.host_paths.clone(),
            worker_tls: tls.as_ref().map(|(_, signer)| worker_tls_issuer(signer.clone(), me)),
            tls: tls.as_ref().map(|(state, _)| state.clone()),
            image_reboot: nodeos_api::node::under_init().then(|| {
                nodeos_compute::upgrade::ImageReboot::new(
                    dir.path.clone(),
                    Arc::new(|| {
                        let pid1 = nix::unistd::Pid::from_raw(1);
                        if let Err(e) = nix::sys::signal::kill(pid1, nix::sys::signal::Signal::SIGUSR1) {
                            tracing::error!(error = %e, "cannot ask PID 1 to reboot into the staged image");
                        }
                    }),
                )
            }),
        },
        meta.clone(),
        volumes.clone(),
        networks.clone(),
        switch.clone(),
        Arc::new(ExecLauncher { exe }),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let formation_task = formation.spawn(stop_rx.clone());
    // A node cut off from the pool pauses its VMs before the pool may count it dead.
    let renewals = formation.clone();
    let fencing_task = compute.spawn_self_fencing(move || renewals.since_renewal(), cfg.leases);
    // On the leader: VMs marked `ha restart` of dead nodes restart elsewhere.
    let ha_task = compute.spawn_ha_controller();
    // On the leader: a rolling image upgrade under way goes on.
    let upgrade_task = compute.spawn_upgrade_controller();
    let replica = Arc::new(Replica::new(store));
    let until_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let block_task = tokio::spawn(nodeos_block::server::serve(
        block_listener,
        replica,
        me,
        cfg.key.clone(),
        tls.as_ref().map(|(state, _)| state.clone()),
        until_stop(stop_rx.clone()),
    ));
    if cfg.nbd_listen.ip().is_loopback() {
        info!(listen = %cfg.nbd_listen, "NBD exports listening");
    } else {
        warn!(
            listen = %cfg.nbd_listen,
            "NBD EXPORTS WITHOUT TLS OFF LOOPBACK: whoever reaches this address reads and writes every volume; keep it on a private network (NBD TLS is not served yet)"
        );
    }
    let nbd_task = tokio::spawn(nodeos_block::nbd::serve(
        nbd_listener,
        Arc::new(VolumeExports::new(volumes.clone())),
        until_stop(stop_rx.clone()),
    ));
    let controller_task = tokio::spawn(
        Controller::new(volumes.clone(), cfg.controller.clone()).run(until_stop(stop_rx.clone())),
    );
    let agent_task = tokio::spawn(Agent::new(meta.clone(), switch.clone()).run(until_stop(stop_rx.clone())));
    let (pxe_agent, pxe) = PxeAgent::new(
        PxeAgentConfig {
            node_id: me,
            pool_name: cfg.pool.clone(),
            pool_key: cfg.key_text.clone(),
            advertise: cfg.advertise,
            source: cfg.pxe_source.clone(),
        },
        meta.clone(),
    );
    let pxe_task = tokio::spawn(pxe_agent.run(until_stop(stop_rx.clone())));
    let mut api_stop = stop_rx.clone();
    let mut api = tokio::spawn(nodeos_api::serve(
        listener,
        ApiConfig { pool_name: cfg.pool.clone(), tls },
        meta.clone(),
        formation,
        compute,
        volumes,
        networks,
        switch,
        pxe,
        async move {
            let _ = api_stop.wait_for(|s| *s).await;
        },
    ));
    let api_result = tokio::select! {
        signal = wait_for_signal() => {
            info!(signal, "stopping node");
            let _ = stop_tx.send(true);
            api.await
        }
        // The API server ended on its own: the node cannot serve, so it stops.
        r = &mut api => {
            let _ = stop_tx.send(true);
            r
        }
    };
    fencing_task.abort();
    ha_task.abort();
    upgrade_task.abort();
    let _ = formation_task.await;
    let _ = controller_task.await;
    let _ = agent_task.await;
    let _ = pxe_task.await;
    let _ = block_task.await;
    match nbd_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "NBD server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "NBD server task failed"),
        Ok(Ok(())) => {}
    }
    let failed = match api_result {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(anyhow::Error::new(e).context("API server failed")),
        Err(e) => Some(anyhow::Error::new(e).context("API server task failed")),
    };
    meta.shutdown().await;
    info!("node stopped");
    failed.map_or(Ok(()), Err)
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names_follow_hostname_label_rules() {
        assert!(valid_pool_name("lab-1"));
        assert!(!valid_pool_name(""));
        assert!(!valid_pool_name("Lab"));
        assert!(!valid_pool_name("-lab"));
        assert!(!valid_pool_name(&"a".repeat(64)));
    }
}
