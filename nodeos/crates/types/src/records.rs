//! Typed records of the pool metadata key space.
//!
//! Keys are UTF-8 paths; each prefix holds one record type, encoded as JSON so
//! that `nodeos pool watch` and stock tools can read them:
//!
//! | prefix | record |
//! |---|---|
//! | `pool` | [`PoolRecord`] (one key) |
//! | `nodes/<node id>` | [`NodeRecord`] |
//! | `vms/<vm id>` | [`VmRecord`] |
//! | `vm-names/<name>` | the VM id holding that name (names are unique in a pool) |
//! | `volumes/<volume id>` | [`VolumeRecord`] |
//! | `volume-names/<name>` | the volume id holding that name |
//! | `networks/<network id>` | [`NetworkRecord`] |
//! | `network-names/<name>`, `network-vnis/<vni>` | the network id holding that name or VNI |
//! | `ports/<port id>` | [`PortRecord`] |
//! | `ipam/<network id>/<ipv4>` | the port id holding that address |
//! | `security-groups/<id>` | [`SecurityGroupRecord`] |
//! | `security-group-names/<name>` | the security group id holding that name |
//! | `images/<image id>` | [`ImageRecord`] |
//! | `image-names/<name>` | the image id holding that name |
//! | `pxe` | [`PxeSettingsRecord`] (one key) |
//! | `custom/<anything>` | operator bytes, never interpreted |

use serde::{Deserialize, Serialize};

use std::net::Ipv4Addr;

use crate::net::{Cidr, MacAddr, SecurityRule};
use crate::{ImageId, NetworkId, NodeId, PoolId, PortId, SecurityGroupId, VmId, VolumeId};

/// Key of the single [`PoolRecord`].
pub const POOL_KEY: &str = "pool";
/// Key of the pool's rolling image upgrade, the last one started ([`UpgradeRecord`]).
pub const UPGRADE_KEY: &str = "upgrade";
/// Prefix of [`NodeRecord`] keys.
pub const NODES_PREFIX: &str = "nodes/";
/// Prefix of the operator's own key space.
pub const CUSTOM_PREFIX: &str = "custom/";

/// Prefix of [`VmRecord`] keys.
pub const VMS_PREFIX: &str = "vms/";
/// Prefix of the VM name index.
pub const VM_NAMES_PREFIX: &str = "vm-names/";

pub fn vm_key(id: VmId) -> String {
    format!("{VMS_PREFIX}{id}")
}

pub fn vm_name_key(name: &str) -> String {
    format!("{VM_NAMES_PREFIX}{name}")
}

/// Prefix of [`VolumeRecord`] keys.
pub const VOLUMES_PREFIX: &str = "volumes/";
/// Prefix of the volume name index.
pub const VOLUME_NAMES_PREFIX: &str = "volume-names/";

pub fn volume_key(id: VolumeId) -> String {
    format!("{VOLUMES_PREFIX}{id}")
}

pub fn volume_name_key(name: &str) -> String {
    format!("{VOLUME_NAMES_PREFIX}{name}")
}

/// Prefix of [`ImageRecord`] keys.
pub const IMAGES_PREFIX: &str = "images/";
/// Prefix of the image name index.
pub const IMAGE_NAMES_PREFIX: &str = "image-names/";

pub fn image_key(id: ImageId) -> String {
    format!("{IMAGES_PREFIX}{id}")
}

pub fn image_name_key(name: &str) -> String {
    format!("{IMAGE_NAMES_PREFIX}{name}")
}

/// Prefix of [`NetworkRecord`] keys.
pub const NETWORKS_PREFIX: &str = "networks/";
/// Prefix of the network name index.
pub const NETWORK_NAMES_PREFIX: &str = "network-names/";
/// Prefix of the network VNI index (one network per VNI).
pub const NETWORK_VNIS_PREFIX: &str = "network-vnis/";
/// Prefix of [`PortRecord`] keys.
pub const PORTS_PREFIX: &str = "ports/";
/// Prefix of the address leases: `ipam/<network id>/<ipv4>`.
pub const IPAM_PREFIX: &str = "ipam/";
/// Prefix of [`SecurityGroupRecord`] keys.
pub const SECURITY_GROUPS_PREFIX: &str = "security-groups/";
/// Prefix of the security group name index.
pub const SECURITY_GROUP_NAMES_PREFIX: &str = "security-group-names/";

pub fn network_key(id: NetworkId) -> String {
    format!("{NETWORKS_PREFIX}{id}")
}

pub fn network_name_key(name: &str) -> String {
    format!("{NETWORK_NAMES_PREFIX}{name}")
}

pub fn network_vni_key(vni: u32) -> String {
    format!("{NETWORK_VNIS_PREFIX}{vni}")
}

pub fn port_key(id: PortId) -> String {
    format!("{PORTS_PREFIX}{id}")
}

pub fn ipam_key(network: NetworkId, ip: Ipv4Addr) -> String {
    format!("{IPAM_PREFIX}{network}/{ip}")
}

pub fn security_group_key(id: SecurityGroupId) -> String {
    format!("{SECURITY_GROUPS_PREFIX}{id}")
}

pub fn security_group_name_key(name: &str) -> String {
    format!("{SECURITY_GROUP_NAMES_PREFIX}{name}")
}

/// Key of a node's record.
pub fn node_key(id: NodeId) -> String {
    format!("{NODES_PREFIX}{id}")
}

/// Prefix of the removed nodes' records ([`RemovedNode`]).
pub const REMOVED_NODES_PREFIX: &str = "removed-nodes/";

/// Key of a removed node's record.
pub fn removed_node_key(id: NodeId) -> String {
    format!("{REMOVED_NODES_PREFIX}{id}")
}

/// The pool itself, written by the first leader right after initialising raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub id: PoolId,
    pub name: String,
    pub created_at_ms: u64,
    /// The node that initialised the pool.
    pub founder: NodeId,
}

/// A node known to the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Address its gRPC server is reached at (host:port).
    pub address: String,
    pub hostname: String,
    /// nodeos version string of the binary it last started with.
    pub version: String,
    /// Hash of the node image, empty outside a node image.
    #[serde(default)]
    pub image_hash: String,
    pub joined_at_ms: u64,
    /// Address its block replica server is reached at (host:port); empty on
    /// nodes that serve no replicas.
    #[serde(default)]
    pub block_address: String,
    /// Bytes its replica store may hold (free space of the store's file
    /// system plus what it already holds), as last reported.
    #[serde(default)]
    pub block_capacity: u64,
    /// Address its switch receives VXLAN tunnel traffic on (ip:port); empty
    /// on nodes without a switch.
    #[serde(default)]
    pub vxlan_address: String,
    /// What KVM offers VMs on this node; `None` on a node without KVM (it
    /// runs no VMs and does not narrow the pool's CPU baseline).
    #[serde(default)]
    pub cpu: Option<crate::cpu::CpuModel>,
    /// Memory of the node, MiB (0: not reported by this node's version).
    #[serde(default)]
    pub memory_mib: u64,
    /// In maintenance: no new VMs or volume copies are placed here.
    #[serde(default)]
    pub maintenance: bool,
    /// Being removed from the pool (`nodeos node remove`): nothing new is
    /// placed here and its volume copies are rebuilt on other nodes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
}

/// A node removed from the pool: its id is refused from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    pub id: NodeId,
    pub hostname: String,
    pub removed_at_ms: u64,
}

/// What a VM is made of. Paths are on the node that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// A file on the VM's node, or a pool image: `image:<image id>` (see [`image_ref`]).
    pub kernel: String,
    /// Like `kernel`.
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// NoCloud data for cloud-init; its node builds a seed disk from it at
    /// every start and attaches it after `disks`. Records without it load as `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
}

/// What cloud-init in the guest is told (NoCloud `meta-data` and `user-data`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudInit {
    /// The `user-data` file, verbatim; empty stands for `#cloud-config`.
    /// Stored as hex: a JSON array of numbers takes up to twice the room.
    #[serde(default, with = "hex_bytes")]
    pub user_data: Vec<u8>,
    /// OpenSSH public keys, one line each (`meta-data` `public-keys`).
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// The guest's `local-hostname`; empty = the VM's name where that is a host name.
    #[serde(default)]
    pub hostname: String,
}

/// Bytes as a lowercase hex string in JSON records.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        hex::decode(String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// A VM disk: a file on the VM's node, or a pool volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// File on the VM's node; empty when `volume` is set.
    #[serde(default)]
    pub path: String,
    /// Pool volume backing the disk.
    #[serde(default)]
    pub volume: Option<VolumeId>,
    #[serde(default)]
    pub read_only: bool,
}

/// A VM NIC: attached to a host tap device, or to a port of a pool network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Host tap device the node attaches the NIC to; empty when `port` is set.
    #[serde(default)]
    pub tap: String,
    /// Switch port of a pool network the NIC plugs into.
    #[serde(default)]
    pub port: Option<PortId>,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Stopped,
    Starting,
    Running,
    Paused,
    Stopping,
    /// The worker died without being asked to (signal, exit code, guest crash).
    Crashed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }
}

/// A VM of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: VmId,
    pub name: String,
    pub spec: VmSpec,
    /// The node it lives on.
    pub node: NodeId,
    pub state: VmState,
    /// Why it is in that state (exit status of a crashed worker, ...).
    #[serde(default)]
    pub reason: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// A live migration under way (set by the owner when it starts, cleared
    /// by the commit or when it fails).
    #[serde(default)]
    pub migration: Option<VmMigration>,
    /// High availability: whether the pool restarts the VM when it dies
    /// with its node (or crashes), and in which order.
    #[serde(default, skip_serializing_if = "VmHa::is_off")]
    pub ha: VmHa,
    /// When the pool last restarted it for HA (unix ms, oldest first, the
    /// last [`HA_HISTORY`] kept): the flap guard counts them. An operator's
    /// start clears them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ha_restarts: Vec<u64>,
}

/// HA restarts remembered per VM.
pub const HA_HISTORY: usize = 8;

/// A VM's high-availability setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHa {
    /// Restart the VM elsewhere when its node is dead, or where it is when
    /// it crashed.
    pub restart: bool,
    /// Higher restarts first when several must (-1000..=1000).
    #[serde(default)]
    pub priority: i32,
}

impl VmHa {
    pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

    pub fn is_off(&self) -> bool {
        *self == VmHa::default()
    }
}

/// A live migration of a VM, as its record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMigration {
    pub to: NodeId,
    pub started_at_ms: u64,
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Usable.
    Available,
    /// Being deleted: replicas are reclaiming its space.
    Deleting,
}

/// Who holds a volume open for writing. Opening takes a new generation; the
/// replicas refuse writes from older ones (fencing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeWriter {
    /// The node the writer runs on.
    pub node: NodeId,
    /// What it is: `vm <id>`, `nbd`, `import`.
    pub holder: String,
    pub since_ms: u64,
    /// The generation this writer opened with (unique per open): tells its
    /// later generations (handed to it when a snapshot seals its top layer)
    /// from another opener's, and finds its slot when it closes.
    #[serde(default)]
    pub token: u64,
}

/// A frozen point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// The frozen layer holding the snapshot's newest blocks.
    pub layer: u64,
    pub created_at_ms: u64,
}

/// A replicated block volume of the pool.
///
/// The volume is a sequence of `extent_size` extents; extent `i` is held by
/// the nodes in `placement[i]`. Its blocks live in a chain of layers (oldest
/// first; the last one takes writes): a snapshot freezes the top layer and
/// pushes a new one, a clone starts a new chain on top of a snapshot's layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub extent_size: u64,
    /// How many copies of each extent the pool keeps (3, fewer only on 1–2 node pools).
    pub replicas: u8,
    /// Replica set of each extent, in extent order.
    pub placement: Vec<Vec<NodeId>>,
    /// Layer chain, oldest first; the last one takes writes.
    pub layers: Vec<u64>,
    /// Fencing generation: the latest one handed to a writer.
    pub generation: u64,
    #[serde(default)]
    pub writer: Option<VolumeWriter>,
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    /// Snapshot this volume was cloned from (`volume id/snapshot name`), if any.
    #[serde(default)]
    pub origin: Option<String>,
    pub state: VolumeState,
    /// Why the volume is not fully protected (fewer replicas than the pool
    /// wants, a lost copy being rebuilt); empty when healthy.
    #[serde(default)]
    pub warning: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// How a VM spec names a pool image instead of a file: `image:<name or id>`
/// as asked, `image:<id>` once recorded.
pub const IMAGE_REF_PREFIX: &str = "image:";

/// The image a VM's `kernel` or `initrd` names, if it names one rather than a file.
pub fn image_ref(source: &str) -> Option<&str> {
    source.strip_prefix(IMAGE_REF_PREFIX)
}

/// What an image holds; it decides which checks its bytes pass at upload and
/// which VM field may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageKind {
    /// A guest kernel that the VMM boots directly.
    Kernel,
    /// A guest initramfs (any bytes).
    Initrd,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Kernel => "kernel",
            ImageKind::Initrd => "initrd",
        }
    }
}

/// How the VMM enters a kernel, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelFormat {
    /// A bzImage, entered through the Linux 64-bit boot protocol.
    BzImage {
        /// Boot protocol version of its setup header (0x020f = 2.15).
        protocol: u16,
    },
    /// An ELF64 vmlinux; entered through PVH when it carries the Xen PVH
    /// note, else through the Linux 64-bit boot protocol.
    Elf { pvh: bool },
}

impl KernelFormat {
    /// Whether the kernel is entered in 64-bit mode through identity-mapped
    /// page tables (everything but PVH).
    pub fn linux64(self) -> bool {
        !matches!(self, KernelFormat::Elf { pvh: true })
    }
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelFormat::BzImage { protocol } => {
                write!(f, "bzImage, boot protocol {}.{:02}", protocol >> 8, protocol & 0xff)
            }
            KernelFormat::Elf { pvh: true } => f.write_str("ELF64 with a PVH entry"),
            KernelFormat::Elf { pvh: false } => f.write_str("ELF64 vmlinux"),
        }
    }
}

/// What the VMM's loader needs of a VM to boot a kernel, read from the
/// kernel's headers (`nodeos_vmm::boot::probe`): recorded with a kernel image,
/// so that a VM's memory, initramfs and command line are checked against it
/// when the VM is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub format: KernelFormat,
    /// End (exclusive guest address) of the memory the kernel occupies
    /// before it reads the memory map; the initramfs goes above it.
    pub kernel_end: u64,
    /// The initramfs must end at or below this guest address (and below the
    /// end of low RAM); `u64::MAX` when only low RAM limits it.
    pub initrd_limit: u64,
    /// Longest command line the kernel takes, without the NUL.
    pub cmdline_max: u64,
}

/// A guest kernel or initramfs stored in the pool: its bytes are the first
/// `size_bytes` bytes of `volume`, a replicated volume of its own, and hash to
/// `sha256`. An image never changes; VMs name it as `image:<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: ImageId,
    pub name: String,
    pub kind: ImageKind,
    /// Exact length of the image (its volume is rounded up to whole blocks).
    pub size_bytes: u64,
    /// SHA-256 of the image's bytes, lowercase hex.
    pub sha256: String,
    /// The volume holding the bytes.
    pub volume: VolumeId,
    /// What a kernel image needs of a VM; `None` for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelInfo>,
    pub created_at_ms: u64,
}

/// Default MTU offered to a network's ports: a 1500-byte fabric less the
/// 50 bytes of VXLAN over IPv4.
pub const DEFAULT_NETWORK_MTU: u16 = 1450;

/// A tenant L2 network of the pool, carried between nodes in VXLAN with its VNI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub id: NetworkId,
    pub name: String,
    /// VXLAN network identifier, unique in the pool (1..=16777215).
    pub vni: u32,
    /// The IPv4 block its ports get addresses from.
    pub cidr: Cidr,
    /// Router handed out by DHCP; with no uplink the switch answers ARP for it.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// MTU handed out by DHCP.
    pub mtu: u16,
    /// DNS servers handed out by DHCP.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
    /// Host interface (a Linux bridge) on one node that the network is bridged to.
    #[serde(default)]
    pub uplink: Option<Uplink>,
    /// VTEPs outside the pool (ip:port, e.g. a Linux host's vxlan device)
    /// that receive the network's flooded frames and may send into it.
    #[serde(default)]
    pub external_vteps: Vec<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// A network's bridge to the outside world: one node, one host bridge. One
/// node only, so the fabric and the outside network never form a loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uplink {
    pub node: NodeId,
    pub bridge: String,
}

/// What a switch port connects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortKind {
    /// A host tap device the node creates with this name (host access, tests).
    Tap { ifname: String },
    /// NIC `nic` of a VM: the port is live while the VM runs.
    Vm { vm: VmId, nic: u8 },
}

/// A port of a network: where it lives, its addresses and its filters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    pub id: PortId,
    pub network: NetworkId,
    /// The node whose switch holds the port.
    pub node: NodeId,
    pub kind: PortKind,
    pub mac: MacAddr,
    /// The address leased to it (from `ipam/`); handed out by DHCP.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Security groups applied to the port; with none, the port may start
    /// any connection and accepts only the replies.
    #[serde(default)]
    pub security_groups: Vec<SecurityGroupId>,
    /// Anti-spoofing and security groups; off only for trusted appliances.
    pub port_security: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

/// A named set of allow rules, applied to the ports that list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroupRecord {
    pub id: SecurityGroupId,
    pub name: String,
    pub rules: Vec<SecurityRule>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl VolumeRecord {
    /// Index of the extent holding byte `offset`.
    pub fn extent_of(&self, offset: u64) -> usize {
        usize::try_from(offset / self.extent_size).unwrap_or(usize::MAX)
    }

    /// The layer that takes writes.
    pub fn top_layer(&self) -> u64 {
        self.layers.last().copied().unwrap_or(0)
    }
}

/// Key of the single [`PxeSettingsRecord`].
pub const PXE_KEY: &str = "pxe";
/// HTTP port of the built-in PXE server when the settings give none.
pub const DEFAULT_PXE_HTTP_PORT: u16 = 7780;
/// Longest `append` of the PXE settings: the kernel command line is 2048 bytes on x86, and the
/// image's own arguments and the pool's come first.
pub const MAX_PXE_APPEND: usize = 512;

/// Which nodes serve PXE, where, and what the machines they boot are told.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PxeSettingsRecord {
    pub enabled: bool,
    /// Interface to serve on; empty: the one holding the node's advertised address.
    #[serde(default)]
    pub interface: String,
    /// Nodes that serve; empty: every node.
    #[serde(default)]
    pub nodes: Vec<NodeId>,
    /// Extra kernel arguments for the machines booted.
    #[serde(default)]
    pub append: String,
    #[serde(default)]
    pub http_port: u16,
}

impl PxeSettingsRecord {
    pub fn serves(&self, node: NodeId) -> bool {
        self.enabled && (self.nodes.is_empty() || self.nodes.contains(&node))
    }

    pub fn http_port(&self) -> u16 {
        if self.http_port == 0 { DEFAULT_PXE_HTTP_PORT } else { self.http_port }
    }

    /// Checks operator input; the error names the field and what it allows.
    pub fn validate(&self) -> Result<(), String> {
        if !self.interface.is_empty()
            && (self.interface.len() > 15
                || !self.interface.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)))
        {
            return Err(format!(
                "interface {:?} is not an interface name (1..=15 of [A-Za-z0-9-_.@])",
                self.interface
            ));
        }
        if self.append.len() > MAX_PXE_APPEND {
            return Err(format!("append is {} bytes; at most {MAX_PXE_APPEND}", self.append.len()));
        }
        if let Some(c) = self.append.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ') || *c == '$') {
            return Err(format!(
                "append holds {c:?}; kernel arguments here are printable ASCII without `$` (iPXE would expand it)"
            ));
        }
        if let Some(w) = self.append.split_whitespace().find(|w| {
            ["initrd=", "nodeos.image=", "nodeos.pool=", "nodeos.key=", "nodeos.seeds="]
                .iter()
                .any(|p| w.starts_with(p))
        }) {
            return Err(format!(
                "append word `{w}`: the PXE server sets the image, pool, key, seeds and initrd itself"
            ));
        }
        if self.http_port != 0 && self.http_port < 1024 && self.http_port != 80 {
            return Err(format!(
                "http_port {} is reserved; use 80 or 1024..=65535 (0 = {DEFAULT_PXE_HTTP_PORT})",
                self.http_port
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_record_json_round_trip() {
        let r = NodeRecord {
            id: NodeId(7),
            address: "127.0.0.1:7700".into(),
            hostname: "h".into(),
            version: "0.1.0".into(),
            image_hash: String::new(),
            block_address: String::new(),
            vxlan_address: String::new(),
            block_capacity: 0,
            joined_at_ms: 1,
            cpu: None,
            memory_mib: 4096,
            maintenance: false,
            removing: false,
        };
        let j = serde_json::to_vec(&r).expect("serializable");
        assert_eq!(serde_json::from_slice::<NodeRecord>(&j).expect("parses"), r);
        assert_eq!(node_key(NodeId(7)), "nodes/0000000000000007");
    }

    #[test]
    fn vm_records_from_before_cloud_init_load_and_user_data_is_hex() {
        let old = br#"{"id":171,"name":"a","spec":{"vcpus":1,"memory_mib":64,"kernel":"/k"},
            "node":1,"state":"Stopped","created_at_ms":1,"updated_at_ms":2}"#;
        let r: VmRecord = serde_json::from_slice(old).expect("an old record loads");
        assert_eq!(r.spec.cloud_init, None);
        assert!(
            !String::from_utf8(serde_json::to_vec(&r).expect("serializable"))
                .expect("utf-8")
                .contains("cloud_init")
        );

        let ci = CloudInit {
            user_data: b"#cloud-config\n\xff".to_vec(),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAA me".into()],
            hostname: "web-1".into(),
        };
        let spec = VmSpec { cloud_init: Some(ci.clone()), ..r.spec };
        let j = serde_json::to_value(&spec).expect("serializable");
        assert_eq!(j["cloud_init"]["user_data"], "23636c6f75642d636f6e6669670aff");
        let back: VmSpec = serde_json::from_value(j).expect("parses");
        assert_eq!(back.cloud_init, Some(ci));
        let bad = serde_json::json!({
            "vcpus": 1, "memory_mib": 64, "kernel": "/k", "cloud_init": {"user_data": "zz"}
        });
        assert!(serde_json::from_value::<VmSpec>(bad).is_err(), "user_data must be hex");
    }

    #[test]
    fn pxe_settings_are_checked_field_by_field() {
        let ok =
            PxeSettingsRecord { enabled: true, append: "nodeos.dns=10.0.0.53".into(), ..Default::default() };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.http_port(), DEFAULT_PXE_HTTP_PORT);
        let me = NodeId(7);
        assert!(ok.serves(me));
        assert!(!PxeSettingsRecord { nodes: vec![NodeId(8)], ..ok.clone() }.serves(me));
        assert!(!PxeSettingsRecord { enabled: false, ..ok.clone() }.serves(me));
        for (bad, why) in [
            (PxeSettingsRecord { interface: "eth0/1".into(), ..ok.clone() }, "not an interface name"),
            (PxeSettingsRecord { append: "a=${x}".into(), ..ok.clone() }, "without `$`"),
            (PxeSettingsRecord { append: "nodeos.key=x".into(), ..ok.clone() }, "sets the image, pool, key"),
            (PxeSettingsRecord { append: "x".repeat(MAX_PXE_APPEND + 1), ..ok.clone() }, "at most 512"),
            (PxeSettingsRecord { http_port: 22, ..ok.clone() }, "reserved"),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}

/// A rolling upgrade of the pool's nodes to another node image, one node at
/// a time (see `nodeos_compute::upgrade`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The image every node is to run (its manifest's `image_hash`).
    pub image_hash: String,
    /// nodeos version the image carries, from its manifest.
    pub version: String,
    /// The image's default kernel command line (part of its hash).
    pub cmdline: String,
    /// The image's kernel and initramfs, stored as pool images.
    pub kernel_image: crate::ImageId,
    pub initrd_image: crate::ImageId,
    pub state: UpgradeState,
    /// Why it failed, or what it waits for.
    #[serde(default)]
    pub reason: String,
    /// Nodes in the order they are upgraded (the leader of the start last).
    pub nodes: Vec<UpgradeNode>,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpgradeState {
    Running,
    Done,
    /// Stopped at a node, saying why; the nodes before it run the new image.
    Failed,
}

impl UpgradeState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeState::Running => "running",
            UpgradeState::Done => "done",
            UpgradeState::Failed => "failed",
        }
    }
}

/// One node's part of an upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeNode {
    pub id: NodeId,
    pub phase: UpgradePhase,
    /// When its turn began and ended (unix ms, 0: not yet).
    #[serde(default)]
    pub started_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: u64,
}

/// Where a node is in an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpgradePhase {
    Pending,
    /// In maintenance, its VMs live-migrating off, the new image being staged.
    Draining,
    /// Rebooting into the new image.
    Rebooting,
    /// Back with the new image; leaving maintenance.
    Rejoined,
    Done,
    Failed,
}

impl UpgradePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradePhase::Pending => "pending",
            UpgradePhase::Draining => "draining",
            UpgradePhase::Rebooting => "rebooting",
            UpgradePhase::Rejoined => "rejoined",
            UpgradePhase::Done => "done",
            UpgradePhase::Failed => "failed",
        }
    }
}
