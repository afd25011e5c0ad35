//! `nodeos network|port|security-group|switch`: tenant networks, their ports,
//! security groups and each node's switch.

use clap::{Subcommand, ValueEnum};
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::network_service_client::NetworkServiceClient;
use nodeos_types::net::SecurityRule;

use super::output;
use super::{CliError, Ctx, Format};

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a tenant network (an L2 segment carried between nodes in VXLAN).
    Create {
        name: String,
        /// IPv4 block its ports get addresses from (/8../30), e.g. 10.0.0.0/24.
        #[arg(long)]
        cidr: String,
        /// VXLAN network identifier, 1..=16777215 (default: the lowest free one from 4096).
        #[arg(long)]
        vni: Option<u32>,
        /// Router handed out by DHCP (default: the block's first host address).
        #[arg(long, conflicts_with = "no_gateway")]
        gateway: Option<String>,
        /// Hand out no router.
        #[arg(long)]
        no_gateway: bool,
        /// MTU handed out by DHCP, 576..=9000 (default 1450).
        #[arg(long)]
        mtu: Option<u32>,
        /// DNS servers handed out by DHCP: IP,...
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// DHCP lease time (default one day).
        #[arg(long)]
        lease_secs: Option<u32>,
        /// Bridge the network to a host bridge on one node: NODE_ID:BRIDGE.
        #[arg(long)]
        uplink: Option<String>,
        /// VTEPs outside the pool that take part (e.g. a Linux vxlan device): IP[:PORT],...
        #[arg(long = "vtep", value_delimiter = ',')]
        vteps: Vec<String>,
    },
    /// Every network of the pool.
    List,
    /// One network and its ports.
    Show { network: String },
    /// Change what DHCP hands out, the uplink or the external VTEPs.
    Set {
        network: String,
        #[arg(long)]
        mtu: Option<u32>,
        /// Replace the DNS servers: IP,...
        #[arg(long, value_delimiter = ',', conflicts_with = "no_dns")]
        dns: Vec<String>,
        /// Hand out no DNS servers.
        #[arg(long)]
        no_dns: bool,
        #[arg(long)]
        lease_secs: Option<u32>,
        /// Replace the uplink: NODE_ID:BRIDGE.
        #[arg(long, conflicts_with = "no_uplink")]
        uplink: Option<String>,
        /// Remove the uplink.
        #[arg(long)]
        no_uplink: bool,
        /// Replace the external VTEPs: IP[:PORT],...
        #[arg(long = "vtep", value_delimiter = ',', conflicts_with = "no_vteps")]
        vteps: Vec<String>,
        /// Remove every external VTEP.
        #[arg(long)]
        no_vteps: bool,
    },
    /// Delete a network that has no ports left.
    Delete { network: String },
}

#[derive(Debug, Subcommand)]
pub enum PortCmd {
    /// Create a tap port: the node's switch makes the host tap.
    Create {
        /// Network id or name.
        #[arg(long)]
        network: String,
        /// Node whose switch makes the tap (default: the node answering).
        #[arg(long)]
        node: Option<String>,
        /// Host tap name.
        #[arg(long)]
        tap: String,
        /// aa:bb:cc:dd:ee:ff (default: a random one).
        #[arg(long)]
        mac: Option<String>,
        /// Address on the network (default: the lowest free one).
        #[arg(long)]
        ip: Option<String>,
        /// Security group id or name. Repeatable; with none, ingress is refused
        /// except replies.
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// Turn anti-spoofing and security groups off (trusted appliances only).
        #[arg(long)]
        no_port_security: bool,
    },
    /// Every port, or the ports of one network.
    List {
        #[arg(long)]
        network: Option<String>,
    },
    /// One port with its switch counters.
    Show { port: String },
    /// Replace a port's security groups or turn port security on or off.
    Set {
        port: String,
        /// Security group id or name. Repeatable; replaces the port's groups.
        #[arg(long = "security-group", conflicts_with = "no_security_groups")]
        security_groups: Vec<String>,
        /// Take every security group off the port.
        #[arg(long)]
        no_security_groups: bool,
        /// Anti-spoofing and security groups.
        #[arg(long, value_enum)]
        port_security: Option<Toggle>,
    },
    /// Delete a port (ports of VMs go with their VM).
    Delete { port: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
pub enum SecurityGroupCmd {
    /// Create a security group.
    Create {
        name: String,
        /// Allow rule: '<ingress|egress> <any|tcp|udp|icmp> [<port>[-<port>]] [<cidr>]'. Repeatable.
        #[arg(long = "rule")]
        rules: Vec<String>,
        /// Leave out the rules allowing all egress that a new group gets.
        #[arg(long)]
        no_default_egress: bool,
    },
    List,
    /// One group and its rules.
    Show {
        group: String,
    },
    /// Add or delete rules; ports using the group follow at once.
    #[command(subcommand)]
    Rule(RuleCmd),
    /// Delete a group no port uses.
    Delete {
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RuleCmd {
    Add {
        group: String,
        /// Rules, each one argument: 'ingress tcp 22 10.0.0.0/8'.
        #[arg(required = true)]
        rules: Vec<String>,
    },
    Delete {
        group: String,
        #[arg(required = true)]
        rules: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SwitchCmd {
    /// A node's switch: tunnel counters, and per network its ports, MACs and VTEPs.
    Show {
        /// Node id (default: the node answering).
        #[arg(long)]
        node: Option<String>,
    },
}

/// `NODE_ID:BRIDGE`.
pub fn parse_uplink(s: &str) -> Result<pb::Uplink, String> {
    match s.split_once(':') {
        Some((node, bridge)) if !node.is_empty() && !bridge.is_empty() && !bridge.contains(':') => {
            Ok(pb::Uplink { node_id: node.to_owned(), bridge: bridge.to_owned() })
        }
        _ => Err(format!("uplink {s:?} must read NODE_ID:BRIDGE")),
    }
}

/// Rule texts, checked here so a typo is reported before anything is sent.
pub fn parse_rules(rules: &[String]) -> Result<Vec<String>, String> {
    rules
        .iter()
        .map(|r| {
            let r = r.trim();
            r.parse::<SecurityRule>().map(|_| r.to_owned()).map_err(|e| e.to_string())
        })
        .collect()
}

fn arg_error(e: String) -> CliError {
    CliError::Status(format!("invalid argument: {e}"))
}

fn uplink_text(n: &pb::Network) -> String {
    n.uplink.as_ref().map(|u| format!("{}:{}", u.node_id, u.bridge)).unwrap_or_default()
}

fn network_rows(n: &pb::Network) -> Vec<Vec<String>> {
    vec![
        vec!["id".into(), n.id.clone()],
        vec!["name".into(), n.name.clone()],
        vec!["vni".into(), n.vni.to_string()],
        vec!["cidr".into(), n.cidr.clone()],
        vec!["gateway".into(), n.gateway.clone()],
        vec!["mtu".into(), n.mtu.to_string()],
        vec!["dns".into(), n.dns.join(", ")],
        vec!["lease".into(), format!("{} s", n.lease_secs)],
        vec!["uplink".into(), uplink_text(n)],
        vec!["external vteps".into(), n.external_vteps.join(", ")],
        vec!["created (unix ms)".into(), n.created_at_ms.to_string()],
    ]
}

/// The port's network by name, or by id once the network record is gone.
fn port_network(p: &pb::Port) -> &str {
    if p.network.is_empty() { &p.network_id } else { &p.network }
}

/// What the port connects to: its tap, or its VM's NIC.
fn attachment(p: &pb::Port) -> String {
    if p.kind == "vm" { format!("vm {} nic {}", p.vm_id, p.nic) } else { format!("tap {}", p.tap) }
}

fn security_text(p: &pb::Port) -> String {
    if p.port_security { p.security_groups.join(",") } else { "off".into() }
}

fn port_rows(p: &pb::Port) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["id".into(), p.id.clone()],
        vec!["network".into(), format!("{} ({})", port_network(p), p.network_id)],
        vec!["node".into(), p.node_id.clone()],
        vec!["attachment".into(), attachment(p)],
        vec!["mac".into(), p.mac.clone()],
        vec!["ip".into(), p.ip.clone()],
        vec!["security groups".into(), p.security_groups.join(", ")],
        vec!["port security".into(), if p.port_security { "on" } else { "off" }.into()],
    ];
    match p.stats {
        Some(s) => {
            let n = |a: u64, b: u64| format!("{a} / {b}");
            rows.extend([
                vec!["attached".into(), s.attached.to_string()],
                vec!["frames rx / tx".into(), n(s.rx, s.tx)],
                vec!["malformed / spoofed".into(), n(s.malformed, s.spoofed)],
                vec!["denied ingress / egress".into(), n(s.denied_ingress, s.denied_egress)],
                vec!["dhcp answered / dropped".into(), n(s.dhcp_answered, s.dhcp_dropped)],
                vec!["arp answered".into(), s.arp_answered.to_string()],
                vec!["tx dropped".into(), s.tx_dropped.to_string()],
                vec!["flows".into(), s.flows.to_string()],
            ]);
        }
        None if !p.stats_unavailable.is_empty() => {
            rows.push(vec!["counters".into(), format!("unavailable: {}", p.stats_unavailable)]);
        }
        None => {}
    }
    rows
}

const PORT_HEADERS: &[&str] = &["ID", "NETWORK", "NODE", "ATTACHMENT", "MAC", "IP", "SECURITY"];

fn port_row(p: &pb::Port) -> Vec<String> {
    vec![
        p.id.clone(),
        port_network(p).to_owned(),
        p.node_id.clone(),
        attachment(p),
        p.mac.clone(),
        p.ip.clone(),
        security_text(p),
    ]
}

fn print_network(format: Format, n: pb::Network) -> Result<(), CliError> {
    let rows = network_rows(&n);
    output::print(format, &n, &["FIELD", "VALUE"], rows)
}

fn print_port(format: Format, p: pb::Port) -> Result<(), CliError> {
    let rows = port_rows(&p);
    output::print(format, &p, &["FIELD", "VALUE"], rows)
}

fn print_group(format: Format, g: pb::SecurityGroup) -> Result<(), CliError> {
    match format {
        Format::Json => output::print(format, &g, &[], vec![]),
        Format::Table => {
            let rows = vec![
                vec!["id".into(), g.id.clone()],
                vec!["name".into(), g.name.clone()],
                vec!["ports".into(), g.ports.to_string()],
            ];
            print!("{}", output::table(&["FIELD", "VALUE"], &rows));
            println!();
            let rules: Vec<Vec<String>> = g.rules.iter().map(|r| vec![r.clone()]).collect();
            print!("{}", output::table(&["RULE"], &rules));
            Ok(())
        }
    }
}

pub async fn run_network(ctx: Ctx, cmd: NetworkCmd) -> Result<(), CliError> {
    let mut c = NetworkServiceClient::new(ctx.channel.clone());
    let nref = |n: String| pb::NetworkRef { network: n };
    match cmd {
        NetworkCmd::Create { name, cidr, vni, gateway, no_gateway, mtu, dns, lease_secs, uplink, vteps } => {
            let req = pb::CreateNetworkRequest {
                name,
                vni: vni.unwrap_or(0),
                cidr,
                gateway: gateway.unwrap_or_default(),
                no_gateway,
                mtu: mtu.unwrap_or(0),
                dns,
                lease_secs: lease_secs.unwrap_or(0),
                uplink: uplink.as_deref().map(parse_uplink).transpose().map_err(arg_error)?,
                external_vteps: vteps,
            };
            print_network(ctx.output, c.create_network(req).await?.into_inner())
        }
        NetworkCmd::List => {
            let nets = c.list_networks(pb::ListNetworksRequest {}).await?.into_inner().networks;
            let rows = nets
                .iter()
                .map(|n| {
                    vec![
                        n.id.clone(),
                        n.name.clone(),
                        n.vni.to_string(),
                        n.cidr.clone(),
                        n.gateway.clone(),
                        n.mtu.to_string(),
                        uplink_text(n),
                        n.external_vteps.join(","),
                    ]
                })
                .collect();
            let headers = ["ID", "NAME", "VNI", "CIDR", "GATEWAY", "MTU", "UPLINK", "EXTERNAL VTEPS"];
            output::print(ctx.output, &nets, &headers, rows)
        }
        NetworkCmd::Show { network } => {
            let d = c.get_network(nref(network)).await?.into_inner();
            match ctx.output {
                Format::Json => output::print(ctx.output, &d, &[], vec![]),
                Format::Table => {
                    let network = d.network.unwrap_or_default();
                    print!("{}", output::table(&["FIELD", "VALUE"], &network_rows(&network)));
                    println!();
                    let rows: Vec<Vec<String>> = d.ports.iter().map(port_row).collect();
                    print!("{}", output::table(PORT_HEADERS, &rows));
                    Ok(())
                }
            }
        }
        NetworkCmd::Set { network, mtu, dns, no_dns, lease_secs, uplink, no_uplink, vteps, no_vteps } => {
            let set_dns = no_dns || !dns.is_empty();
            let set_uplink = no_uplink || uplink.is_some();
            let set_vteps = no_vteps || !vteps.is_empty();
            if mtu.is_none() && lease_secs.is_none() && !set_dns && !set_uplink && !set_vteps {
                return Err(arg_error(
                    "nothing to change: give --mtu, --dns, --lease-secs, --uplink or --vtep (or a --no-* flag)"
                        .into(),
                ));
            }
            let req = pb::UpdateNetworkRequest {
                network,
                mtu,
                lease_secs,
                set_dns,
                dns,
                set_uplink,
                uplink: uplink.as_deref().map(parse_uplink).transpose().map_err(arg_error)?,
                set_external_vteps: set_vteps,
                external_vteps: vteps,
            };
            print_network(ctx.output, c.update_network(req).await?.into_inner())
        }
        NetworkCmd::Delete { network } => {
            let n = c.delete_network(nref(network)).await?.into_inner();
            let what = format!("network {} ({})", n.name, n.id);
            output::print_deleted(ctx.output, &n, what)
        }
    }
}

pub async fn run_port(ctx: Ctx, cmd: PortCmd) -> Result<(), CliError> {
    let mut c = NetworkServiceClient::new(ctx.channel.clone());
    let pref = |p: String| pb::PortRef { port: p };
    match cmd {
        PortCmd::Create { network, node, tap, mac, ip, security_groups, no_port_security } => {
            let req = pb::CreatePortRequest {
                network,
                node_id: node.unwrap_or_default(),
                tap,
                mac: mac.unwrap_or_default(),
                ip: ip.unwrap_or_default(),
                security_groups,
                no_port_security,
            };
            print_port(ctx.output, c.create_port(req).await?.into_inner())
        }
        PortCmd::List { network } => {
            let req = pb::ListPortsRequest { network: network.unwrap_or_default() };
            let ports = c.list_ports(req).await?.into_inner().ports;
            let rows = ports.iter().map(port_row).collect();
            output::print(ctx.output, &ports, PORT_HEADERS, rows)
        }
        PortCmd::Show { port } => print_port(ctx.output, c.get_port(pref(port)).await?.into_inner()),
        PortCmd::Set { port, security_groups, no_security_groups, port_security } => {
            let set_security_groups = no_security_groups || !security_groups.is_empty();
            if !set_security_groups && port_security.is_none() {
                return Err(arg_error(
                    "nothing to change: give --security-group, --no-security-groups or --port-security"
                        .into(),
                ));
            }
            let req = pb::SetPortSecurityRequest {
                port,
                set_security_groups,
                security_groups,
                port_security: port_security.map(|t| t == Toggle::On),
            };
            print_port(ctx.output, c.set_port_security(req).await?.into_inner())
        }
        PortCmd::Delete { port } => {
            let p = c.delete_port(pref(port)).await?.into_inner();
            let what = format!("port {} ({} on {})", p.id, p.ip, port_network(&p));
            output::print_deleted(ctx.output, &p, what)
        }
    }
}

pub async fn run_security_group(ctx: Ctx, cmd: SecurityGroupCmd) -> Result<(), CliError> {
    let mut c = NetworkServiceClient::new(ctx.channel.clone());
    let gref = |g: String| pb::SecurityGroupRef { group: g };
    match cmd {
        SecurityGroupCmd::Create { name, rules, no_default_egress } => {
            let rules = parse_rules(&rules).map_err(arg_error)?;
            let req = pb::CreateSecurityGroupRequest { name, rules, no_default_egress };
            print_group(ctx.output, c.create_security_group(req).await?.into_inner())
        }
        SecurityGroupCmd::List => {
            let groups = c.list_security_groups(pb::ListSecurityGroupsRequest {}).await?.into_inner().groups;
            let rows = groups
                .iter()
                .map(|g| vec![g.id.clone(), g.name.clone(), g.rules.len().to_string(), g.ports.to_string()])
                .collect();
            output::print(ctx.output, &groups, &["ID", "NAME", "RULES", "PORTS"], rows)
        }
        SecurityGroupCmd::Show { group } => {
            print_group(ctx.output, c.get_security_group(gref(group)).await?.into_inner())
        }
        SecurityGroupCmd::Rule(RuleCmd::Add { group, rules }) => {
            let add = parse_rules(&rules).map_err(arg_error)?;
            let req = pb::ChangeRulesRequest { group, add, remove: vec![] };
            print_group(ctx.output, c.change_rules(req).await?.into_inner())
        }
        SecurityGroupCmd::Rule(RuleCmd::Delete { group, rules }) => {
            let remove = parse_rules(&rules).map_err(arg_error)?;
            let req = pb::ChangeRulesRequest { group, add: vec![], remove };
            print_group(ctx.output, c.change_rules(req).await?.into_inner())
        }
        SecurityGroupCmd::Delete { group } => {
            let g = c.delete_security_group(gref(group)).await?.into_inner();
            let what = format!("security group {} ({})", g.name, g.id);
            output::print_deleted(ctx.output, &g, what)
        }
    }
}

pub async fn run_switch(ctx: Ctx, cmd: SwitchCmd) -> Result<(), CliError> {
    let mut c = NetworkServiceClient::new(ctx.channel.clone());
    match cmd {
        SwitchCmd::Show { node } => {
            let req = pb::GetSwitchRequest { node_id: node.unwrap_or_default() };
            let s = c.get_switch(req).await?.into_inner();
            match ctx.output {
                Format::Json => output::print(ctx.output, &s, &[], vec![]),
                Format::Table => {
                    let t = s.tunnel.unwrap_or_default();
                    let rows = vec![
                        vec!["node".into(), s.node_id.clone()],
                        vec!["vxlan address".into(), s.vxlan_address.clone()],
                        vec!["tunnel rx / tx".into(), format!("{} / {}", t.rx, t.tx)],
                        vec![
                            "tunnel dropped".into(),
                            format!(
                                "bad header {}, unknown vni {}, unknown vtep {}, send failed {}",
                                t.bad_header, t.unknown_vni, t.unknown_vtep, t.send_failed
                            ),
                        ],
                    ];
                    print!("{}", output::table(&["FIELD", "VALUE"], &rows));
                    println!();
                    let nets: Vec<Vec<String>> = s
                        .networks
                        .iter()
                        .map(|n| {
                            vec![
                                n.vni.to_string(),
                                n.network.clone(),
                                n.ports.to_string(),
                                n.macs.to_string(),
                                n.macs_refused.to_string(),
                                n.vteps.len().to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        output::table(&["VNI", "NETWORK", "PORTS", "MACS", "REFUSED", "VTEPS"], &nets)
                    );
                    let vteps: Vec<Vec<String>> = s
                        .networks
                        .iter()
                        .flat_map(|n| {
                            n.vteps.iter().map(move |v| {
                                vec![
                                    n.vni.to_string(),
                                    v.address.clone(),
                                    v.rx.to_string(),
                                    v.tx.to_string(),
                                    v.dropped.to_string(),
                                ]
                            })
                        })
                        .collect();
                    if !vteps.is_empty() {
                        println!();
                        print!("{}", output::table(&["VNI", "VTEP", "RX", "TX", "DROPPED"], &vteps));
                    }
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplinks_read_node_colon_bridge() {
        let u = parse_uplink("00000000000000aa:br0").unwrap();
        assert_eq!((u.node_id.as_str(), u.bridge.as_str()), ("00000000000000aa", "br0"));
        for bad in ["br0", ":br0", "00000000000000aa:", "a:b:c", ""] {
            assert!(parse_uplink(bad).unwrap_err().contains("NODE_ID:BRIDGE"), "{bad:?}");
        }
    }

    #[test]
    fn rules_are_checked_and_kept_as_typed() {
        let ok = parse_rules(&["ingress tcp 22 10.0.0.0/8".into(), " egress any ".into()]).unwrap();
        assert_eq!(ok, ["ingress tcp 22 10.0.0.0/8", "egress any"]);
        assert!(parse_rules(&["ingress tcp 0".into()]).unwrap_err().contains("port"));
        assert!(parse_rules(&["sideways tcp".into()]).unwrap_err().contains("direction"));
        assert!(parse_rules(&["ingress icmp 22".into()]).is_err());
    }
}
