//! `nodeos vm create|start|stop|pause|resume|list|show|delete|console`.

use std::io::Write;

use clap::{Args, Subcommand};
use futures::StreamExt;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::vm_service_client::VmServiceClient;

use super::output;
use super::{CliError, Ctx, Format};

#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// Record a VM on the answering node (it stays stopped).
    Create(CreateArgs),
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
    /// Kernel image on the node: bzImage, ELF vmlinux or PVH ELF.
    #[arg(long)]
    pub kernel: String,
    #[arg(long, default_value = "")]
    pub initrd: String,
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A disk: an image file on the node (PATH) or a pool volume (volume:ID);
    /// append ",ro" for read-only. Repeatable.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// A NIC: on a host tap, TAP or TAP,MAC; or on a pool network,
    /// network=NAME[,mac=MAC][,ip=IP][,sg=G1+G2][,no-port-security]. Repeatable.
    #[arg(long = "nic")]
    pub nics: Vec<String>,
}

const HEADERS: &[&str] = &["ID", "NAME", "STATE", "NODE", "VCPUS", "MEMORY", "REASON"];

fn row(v: &pb::Vm) -> Vec<String> {
    let (vcpus, memory_mib) = v.spec.as_ref().map_or((0, 0), |s| (s.vcpus, s.memory_mib));
    vec![
        v.id.clone(),
        v.name.clone(),
        v.state.clone(),
        v.node_id.clone(),
        vcpus.to_string(),
        format!("{memory_mib} MiB"),
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
        vec!["cmdline".into(), s.cmdline],
        vec!["disks".into(), s.disks.iter().map(disk_text).collect::<Vec<_>>().join(" ")],
        vec!["nics".into(), s.nics.iter().map(nic_text).collect::<Vec<_>>().join(" ")],
        vec!["worker pid".into(), v.worker_pid.to_string()],
    ];
    output::print(format, &v, &["FIELD", "VALUE"], rows)
}

/// `PATH[,ro]` or `volume:ID[,ro]`.
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
            };
            show(
                ctx.output,
                c.create(pb::CreateVmRequest { name: a.name, spec: Some(spec) }).await?.into_inner(),
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
            println!("deleted {v}");
            Ok(())
        }
        VmCmd::Show { vm: v } => show(ctx.output, c.get(vm(v)).await?.into_inner()),
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
}
