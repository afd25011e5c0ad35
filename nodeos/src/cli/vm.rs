//! `nodeos vm create|start|stop|pause|resume|list|show|delete|console|migrate|ha`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use futures::StreamExt;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;

use super::output;
use super::{CliError, Ctx, Format};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Record a VM on the answering node (it stays stopped).
    Create(Box<CreateArgs>),
    /// Start a VM's worker and vCPUs.
    Start {
        vm: String,
    },
    /// Ask the guest to shut down (then kill after --timeout), or kill at once with --force.
    Stop {
        vm: String,
        #[arg(long)]
        force: bool,
        /// Seconds to wait for a graceful shutdown.
        #[arg(long, default_value_t = 30)]
        timeout: u32,
    },
    Pause {
        vm: String,
    },
    Resume {
        vm: String,
    },
    /// Remove a stopped or crashed VM.
    Delete {
        vm: String,
    },
    List,
    Show {
        vm: String,
    },
    /// Live-migrate a running VM to another node; it keeps running through the move.
    ///
    /// Examples: `nodeos vm migrate web --to 2`, `nodeos vm migrate web` (the pool
    /// picks the node with the most free memory), `nodeos vm migrate web --cancel`.
    Migrate {
        vm: String,
        /// Destination node (id or hostname); default: the pool picks one.
        #[arg(long)]
        to: Option<String>,
        /// Longest pause the guest may see, ms.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
        /// Cap on the migration's bandwidth, MiB/s (default: none).
        #[arg(long)]
        bandwidth: Option<u32>,
        /// Cancel the migration of this VM under way (the VM stays where it is).
        #[arg(long)]
        cancel: bool,
    },
    /// Set a VM's high availability: `restart` (the pool restarts it on another
    /// node when its node dies, or where it is when it crashes) or `off`.
    ///
    /// Examples: `nodeos vm ha db restart --priority 10`, `nodeos vm ha db off`.
    Ha {
        vm: String,
        mode: HaMode,
        /// Higher restarts first when several VMs must (-1000..=1000).
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
    },
    /// Attach to the serial console (output; typed lines go to the guest). Ctrl-D ends.
    Console {
        vm: String,
        /// Replay the console log from its start.
        #[arg(long)]
        from_start: bool,
        /// Print what the console has and exit instead of following it.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// The kernel: a file on the node (bzImage, ELF vmlinux or PVH ELF), or a
    /// pool image, image:NAME (see `nodeos image upload`).
    #[arg(long)]
    pub kernel: String,
    /// The initramfs: a file on the node, or a pool image, image:NAME.
    #[arg(long, default_value = "")]
    pub initrd: String,
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A disk: an image file on the node (PATH) or a pool volume (volume:NAME or volume:ID);
    /// append ",ro" for read-only. Repeatable.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// A NIC: on a host tap, TAP or TAP,MAC; or on a pool network,
    /// network=NAME[,mac=MAC][,ip=IP][,sg=G1+G2][,no-port-security]. Repeatable.
    #[arg(long = "nic")]
    pub nics: Vec<String>,
    /// cloud-init user-data for the VM's NoCloud seed disk (#cloud-config,
    /// a script, ...; at most 64 KiB). Any cloud-init flag adds the seed disk.
    #[arg(long = "user-data", value_name = "FILE")]
    pub user_data: Option<PathBuf>,
    /// SSH public keys for cloud-init, one per line as in authorized_keys
    /// (blank and # lines skipped). Repeatable.
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,
    /// The guest's host name for cloud-init (default: the VM's name).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// High availability: `restart` has the pool restart the VM on another
    /// node when its node dies (it needs pool volumes and networks only).
    #[arg(long, value_enum, default_value_t = HaMode::Off)]
    pub ha: HaMode,
    /// With --ha restart: higher restarts first (-1000..=1000).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub ha_priority: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HaMode {
    Restart,
    Off,
}

fn ha_policy(mode: HaMode, priority: i32) -> pb::HaPolicy {
    pb::HaPolicy { restart: mode == HaMode::Restart, priority }
}

fn ha_text(v: &pb::Vm) -> String {
    let Some(ha) = v.ha.as_ref().filter(|h| h.restart) else { return "off".into() };
    let mut t = format!("restart, priority {}", ha.priority);
    if let Some(last) = v.ha_restarts_ms.last() {
        t.push_str(&format!(
            "; restarted by the pool {} time{} (last {})",
            v.ha_restarts_ms.len(),
            if v.ha_restarts_ms.len() == 1 { "" } else { "s" },
            output::time_ms(*last)
        ));
    }
    t
}

const HEADERS: &[&str] = &["ID", "NAME", "STATE", "NODE", "VCPUS", "MEMORY", "HA", "REASON"];

fn row(v: &pb::Vm) -> Vec<String> {
    let (vcpus, memory_mib) = v.spec.as_ref().map_or((0, 0), |s| (s.vcpus, s.memory_mib));
    vec![
        v.id.clone(),
        v.name.clone(),
        v.state.clone(),
        v.node_id.clone(),
        vcpus.to_string(),
        format!("{memory_mib} MiB"),
        if v.ha.as_ref().is_some_and(|h| h.restart) { "restart".into() } else { "-".into() },
        v.reason.clone(),
    ]
}

fn show(format: Format, v: pb::Vm) -> Result<(), CliError> {
    let s = v.spec.clone().unwrap_or_default();
    let rows = vec![
        vec!["id".into(), v.id.clone()],
        vec!["name".into(), v.name.clone()],
        vec!["state".into(), v.state.clone()],
        vec!["reason".into(), v.reason.clone()],
        vec!["node".into(), v.node_id.clone()],
        vec!["vcpus".into(), s.vcpus.to_string()],
        vec!["memory".into(), format!("{} MiB", s.memory_mib)],
        vec!["kernel".into(), s.kernel],
        vec!["initrd".into(), s.initrd],
        vec!["cmdline".into(), s.cmdline],
        vec!["disks".into(), s.disks.iter().map(disk_text).collect::<Vec<_>>().join(" ")],
        vec!["nics".into(), s.nics.iter().map(nic_text).collect::<Vec<_>>().join(" ")],
        vec!["cloud-init".into(), s.cloud_init.as_ref().map_or_else(|| "-".into(), cloud_init_text)],
        vec!["ha".into(), ha_text(&v)],
        vec!["worker pid".into(), v.worker_pid.to_string()],
        vec![
            "migration".into(),
            if v.migrating_to.is_empty() {
                "-".into()
            } else {
                format!("to node {} since {}", v.migrating_to, output::time_ms(v.migration_started_ms))
            },
        ],
    ];
    output::print(format, &v, &["FIELD", "VALUE"], rows)
}

/// `PATH[,ro]` or `volume:NAME_OR_ID[,ro]`.
fn parse_disk(s: &str) -> pb::DiskSpec {
    let (s, read_only) = match s.strip_suffix(",ro") {
        Some(p) => (p, true),
        None => (s, false),
    };
    match s.strip_prefix("volume:") {
        Some(v) => pb::DiskSpec { path: String::new(), read_only, volume: v.to_owned() },
        None => pb::DiskSpec { path: s.to_owned(), read_only, volume: String::new() },
    }
}

/// `TAP[,MAC]` for a NIC on a host tap, or `key=value` pairs: `network=NAME`
/// (or `tap=TAP`), `mac=`, `ip=`, `sg=G1+G2` and the flag `no-port-security`.
fn parse_nic(s: &str) -> Result<pb::NicSpec, String> {
    if !s.contains('=') {
        return Ok(match s.split_once(',') {
            Some((tap, mac)) => {
                pb::NicSpec { tap: tap.to_owned(), mac: mac.to_owned(), ..Default::default() }
            }
            None => pb::NicSpec { tap: s.to_owned(), ..Default::default() },
        });
    }
    let mut n = pb::NicSpec::default();
    for part in s.split(',') {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        let slot = match key {
            "network" => &mut n.network,
            "tap" => &mut n.tap,
            "mac" => &mut n.mac,
            "ip" => &mut n.ip,
            "sg" => {
                n.security_groups.extend(value.split('+').filter(|g| !g.is_empty()).map(str::to_owned));
                continue;
            }
            "no-port-security" if value.is_empty() => {
                n.no_port_security = true;
                continue;
            }
            _ => {
                return Err(format!(
                    "--nic {s:?}: unknown part {part:?}; use network=, tap=, mac=, ip=, sg= and no-port-security"
                ));
            }
        };
        if value.is_empty() || !slot.is_empty() {
            return Err(format!("--nic {s:?}: {key}= needs one value"));
        }
        *slot = value.to_owned();
    }
    match (n.network.is_empty(), n.tap.is_empty()) {
        (true, true) => Err(format!("--nic {s:?}: give network=NAME or a tap")),
        (false, false) => Err(format!("--nic {s:?}: a NIC plugs into a network or a tap, not both")),
        (true, false) if !n.ip.is_empty() || !n.security_groups.is_empty() || n.no_port_security => {
            Err(format!("--nic {s:?}: ip=, sg= and no-port-security need network="))
        }
        _ => Ok(n),
    }
}

/// What a VM's cloud-init data amounts to, without the user-data itself.
fn cloud_init_text(c: &pb::CloudInit) -> String {
    let hostname = if c.hostname.is_empty() { "(the VM's name)" } else { c.hostname.as_str() };
    let keys = match c.ssh_authorized_keys.len() {
        1 => "1 SSH key".to_owned(),
        n => format!("{n} SSH keys"),
    };
    let user_data = if c.user_data.is_empty() {
        "no user-data".to_owned()
    } else {
        format!("user-data {} bytes", c.user_data.len())
    };
    format!("hostname {hostname}, {keys}, {user_data}")
}

/// The keys of an authorized_keys-style text: one per line, blank lines and
/// `#` comments skipped.
fn parse_keys(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

fn read_error(flag: &str, path: &Path, e: std::io::Error) -> CliError {
    CliError::Status(format!("cannot read {flag} {}: {e}", path.display()))
}

/// The cloud-init data the flags ask for; none without any cloud-init flag.
fn cloud_init(a: &CreateArgs) -> Result<Option<pb::CloudInit>, CliError> {
    if a.user_data.is_none() && a.ssh_keys.is_empty() && a.hostname.is_none() {
        return Ok(None);
    }
    let user_data = match &a.user_data {
        Some(p) => std::fs::read(p).map_err(|e| read_error("--user-data", p, e))?,
        None => vec![],
    };
    let mut ssh_authorized_keys = Vec::new();
    for p in &a.ssh_keys {
        let keys = parse_keys(&std::fs::read_to_string(p).map_err(|e| read_error("--ssh-key", p, e))?);
        if keys.is_empty() {
            return Err(CliError::Status(format!("--ssh-key {}: no key in the file", p.display())));
        }
        ssh_authorized_keys.extend(keys);
    }
    Ok(Some(pb::CloudInit {
        user_data,
        ssh_authorized_keys,
        hostname: a.hostname.clone().unwrap_or_default(),
    }))
}

/// A disk as `--disk` takes it.
fn disk_text(d: &pb::DiskSpec) -> String {
    let source = if d.volume.is_empty() { d.path.clone() } else { format!("volume:{}", d.volume) };
    if d.read_only { format!("{source},ro") } else { source }
}

/// A NIC as `--nic` takes it, with its port once it has one.
fn nic_text(n: &pb::NicSpec) -> String {
    if n.port.is_empty() && n.network.is_empty() {
        return format!("{},{}", n.tap, n.mac);
    }
    let network = if n.network.is_empty() { "?" } else { n.network.as_str() };
    format!("network={network},mac={},port={}", n.mac, n.port)
}

pub async fn run(ctx: Ctx, cmd: VmCmd) -> Result<(), CliError> {
    let mut c = VmServiceClient::new(ctx.channel.clone());
    let vm = |v: String| pb::VmRef { vm: v };
    match cmd {
        VmCmd::Create(a) => {
            let cloud_init = cloud_init(&a)?;
            let spec = pb::VmSpec {
                vcpus: a.vcpus,
                memory_mib: a.memory,
                kernel: a.kernel,
                initrd: a.initrd,
                cmdline: a.cmdline,
                disks: a.disks.iter().map(|d| parse_disk(d)).collect(),
                nics: a
                    .nics
                    .iter()
                    .map(|n| parse_nic(n))
                    .collect::<Result<_, _>>()
                    .map_err(|e| CliError::Status(format!("invalid argument: {e}")))?,
                cloud_init,
            };
            show(
                ctx.output,
                c.create(pb::CreateVmRequest {
                    name: a.name,
                    spec: Some(spec),
                    ha: Some(ha_policy(a.ha, a.ha_priority)),
                })
                .await?
                .into_inner(),
            )
        }
        VmCmd::Start { vm: v } => show(ctx.output, c.start(vm(v)).await?.into_inner()),
        VmCmd::Stop { vm: v, force, timeout } => show(
            ctx.output,
            c.stop(pb::StopVmRequest { vm: v, force, timeout_seconds: timeout }).await?.into_inner(),
        ),
        VmCmd::Pause { vm: v } => show(ctx.output, c.pause(vm(v)).await?.into_inner()),
        VmCmd::Resume { vm: v } => show(ctx.output, c.resume(vm(v)).await?.into_inner()),
        VmCmd::Delete { vm: v } => {
            c.delete(vm(v.clone())).await?;
            output::print_deleted(ctx.output, &serde_json::json!({ "deleted": v }), v.clone())
        }
        VmCmd::Show { vm: v } => show(ctx.output, c.get(vm(v)).await?.into_inner()),
        VmCmd::Ha { vm: v, mode, priority } => show(
            ctx.output,
            c.set_ha(pb::SetHaRequest { vm: v, ha: Some(ha_policy(mode, priority)) }).await?.into_inner(),
        ),
        VmCmd::Migrate { vm: v, to, downtime_ms, bandwidth, cancel } => {
            let req = pb::MigrateVmRequest {
                vm: v,
                to: to.unwrap_or_default(),
                downtime_ms,
                bandwidth_mib: bandwidth.unwrap_or(0),
                cancel,
            };
            migrate(ctx.output, &mut c, req).await
        }
        VmCmd::List => {
            let vms = c.list(pb::ListVmsRequest {}).await?.into_inner().vms;
            let rows = vms.iter().map(row).collect();
            output::print(ctx.output, &vms, HEADERS, rows)
        }
        VmCmd::Console { vm: v, from_start, no_follow } => {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsoleInput>(16);
            tx.send(pb::ConsoleInput { vm: v, from_start, data: vec![] })
                .await
                .map_err(|_| CliError::Status("console closed".into()))?;
            if !no_follow {
                // Lines typed on stdin go to the guest; the sender drops at EOF.
                std::thread::spawn(move || {
                    let mut line = String::new();
                    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                        let data = std::mem::take(&mut line).into_bytes();
                        if tx
                            .blocking_send(pb::ConsoleInput { vm: String::new(), from_start: false, data })
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            } else {
                drop(tx);
            }
            let mut out = c.console(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            let mut stdout = std::io::stdout();
            loop {
                let next = if no_follow {
                    match tokio::time::timeout(std::time::Duration::from_millis(500), out.next()).await {
                        Ok(n) => n,
                        Err(_) => break,
                    }
                } else {
                    out.next().await
                };
                let Some(chunk) = next else { break };
                let chunk = chunk?;
                let _ = stdout.write_all(&chunk.data);
                let _ = stdout.flush();
            }
            Ok(())
        }
    }
}

/// Follows a migration's progress stream with a bar on standard error
/// (pass, dirty rate, remaining, expected downtime), then shows the VM.
async fn migrate(
    format: Format,
    c: &mut VmServiceClient<tonic::transport::Channel>,
    req: pb::MigrateVmRequest,
) -> Result<(), CliError> {
    let cancel = req.cancel;
    let mut stream = c.migrate(req).await?.into_inner();
    let bar = super::volume::progress_bar(0);
    let mut last_vm = None;
    while let Some(p) = stream.next().await {
        let p = p?;
        match p.phase.as_str() {
            "preparing" => bar.set_message(format!("preparing node {}", p.to_node)),
            "copying" => {
                bar.set_length(p.memory_bytes);
                bar.set_position(p.bytes_sent.min(p.memory_bytes));
                bar.set_message(format!(
                    "pass {} | {} dirty | {}/s | downtime ~{} ms{}",
                    p.pass,
                    output::bytes(p.dirty_pages * 4096),
                    output::bytes(p.rate_bytes_per_sec),
                    p.expected_downtime_ms,
                    if p.throttle_percent > 0 {
                        format!(" | vCPUs throttled {}%", p.throttle_percent)
                    } else {
                        String::new()
                    }
                ));
            }
            "committed" => {
                bar.finish_and_clear();
                eprintln!(
                    "migrated to node {} in {} ms ({} passes, {} sent, paused {} ms)",
                    p.to_node,
                    p.total_ms,
                    p.pass,
                    output::bytes(p.bytes_sent),
                    p.paused_ms
                );
                last_vm = p.vm;
            }
            _ => last_vm = p.vm.or(last_vm),
        }
    }
    bar.finish_and_clear();
    match last_vm {
        Some(v) => {
            if cancel {
                eprintln!("cancel requested; the VM stays on node {}", v.node_id);
            }
            show(format, v)
        }
        None => Err(CliError::Status("the migration stream ended without an outcome".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_nics_keep_their_old_form() {
        let n = parse_nic("tap0").unwrap();
        assert_eq!((n.tap.as_str(), n.mac.as_str(), n.network.as_str()), ("tap0", "", ""));
        let n = parse_nic("tap0,52:54:00:12:34:56").unwrap();
        assert_eq!((n.tap.as_str(), n.mac.as_str()), ("tap0", "52:54:00:12:34:56"));
        let n = parse_nic("tap=tap1,mac=52:54:00:12:34:56").unwrap();
        assert_eq!((n.tap.as_str(), n.mac.as_str()), ("tap1", "52:54:00:12:34:56"));
    }

    #[test]
    fn network_nics_take_their_port_settings() {
        let n = parse_nic("network=tenant-a").unwrap();
        assert_eq!(n.network, "tenant-a");
        assert!(n.tap.is_empty() && n.security_groups.is_empty() && !n.no_port_security);
        let n = parse_nic("network=tenant-a,mac=52:54:00:12:34:56,ip=10.0.0.5,sg=web+ssh,no-port-security")
            .unwrap();
        assert_eq!(n.mac, "52:54:00:12:34:56");
        assert_eq!(n.ip, "10.0.0.5");
        assert_eq!(n.security_groups, ["web", "ssh"]);
        assert!(n.no_port_security);
        for bad in [
            "network=a,tap=t0",
            "network=",
            "network=a,network=b",
            "network=a,colour=blue",
            "mac=52:54:00:12:34:56",
            "tap=t0,ip=10.0.0.5",
            "network=a,no-port-security=yes",
        ] {
            assert!(parse_nic(bad).is_err(), "{bad:?}");
        }
    }

    fn create(args: &[&str]) -> CreateArgs {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            create: CreateArgs,
        }
        let argv = ["vm-create", "web", "--kernel", "/k"].iter().chain(args);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().create
    }

    #[test]
    fn cloud_init_flags_read_their_files() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(cloud_init(&create(&[])).unwrap(), None, "no flag, no seed");

        let user_data = d.path().join("user-data");
        std::fs::write(&user_data, b"#cloud-config\nruncmd: [ls]\n").unwrap();
        let keys = d.path().join("authorized_keys");
        std::fs::write(&keys, "# laptop\nssh-ed25519 AAAA me@laptop\n\n  ssh-rsa BBBB me@desk  \n").unwrap();
        let more = d.path().join("id_ed25519.pub");
        std::fs::write(&more, "ssh-ed25519 CCCC ci\n").unwrap();
        let (u, k, m) =
            (user_data.display().to_string(), keys.display().to_string(), more.display().to_string());
        let a = create(&["--user-data", &u, "--ssh-key", &k, "--ssh-key", &m, "--hostname", "web-1"]);
        let c = cloud_init(&a).unwrap().unwrap();
        assert_eq!(c.user_data, b"#cloud-config\nruncmd: [ls]\n");
        assert_eq!(
            c.ssh_authorized_keys,
            ["ssh-ed25519 AAAA me@laptop", "ssh-rsa BBBB me@desk", "ssh-ed25519 CCCC ci"]
        );
        assert_eq!(c.hostname, "web-1");
        assert_eq!(cloud_init_text(&c), "hostname web-1, 3 SSH keys, user-data 27 bytes");

        let c = cloud_init(&create(&["--hostname", "db"])).unwrap().unwrap();
        assert!(c.user_data.is_empty() && c.ssh_authorized_keys.is_empty());

        let missing = d.path().join("nope").display().to_string();
        let e = cloud_init(&create(&["--user-data", &missing])).unwrap_err().to_string();
        assert!(e.starts_with("cannot read --user-data ") && e.contains("nope"), "{e}");
        let e = cloud_init(&create(&["--ssh-key", &missing])).unwrap_err().to_string();
        assert!(e.starts_with("cannot read --ssh-key "), "{e}");
        let empty = d.path().join("empty.pub");
        std::fs::write(&empty, "# nothing here\n").unwrap();
        let e = cloud_init(&create(&["--ssh-key", &empty.display().to_string()])).unwrap_err().to_string();
        assert!(e.contains("no key in the file"), "{e}");
    }
}
