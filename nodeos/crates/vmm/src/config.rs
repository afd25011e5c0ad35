//! What the node tells a worker to run: the VM's spec, resolved to host paths
//! and file descriptors. Sent once, as the first control message.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Most vCPUs one VM may have.
pub const MAX_VCPUS: u8 = 64;
/// Most disks, and most NICs, of one VM.
pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 8;
/// Longest kernel command line, bytes (the x86 boot protocol's usual limit).
pub const MAX_CMDLINE: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerConfig {
    /// VM id, for logs.
    pub vm_id: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    /// File the serial console is appended to.
    pub console_log: PathBuf,
    /// The pool's CPU baseline: features beyond it are hidden from the guest,
    /// so it sees the same CPU on every node. `None`: all KVM offers here.
    #[serde(default)]
    pub cpu_baseline: Option<nodeos_types::cpu::CpuModel>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Image file (empty for a volume).
    pub path: PathBuf,
    pub read_only: bool,
    /// A pool volume instead of a file.
    #[serde(default)]
    pub volume: Option<VolumeDisk>,
}

/// A pool volume the worker opens itself, with the generation the node took
/// for it (fencing any older writer).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDisk {
    pub layout: nodeos_block::client::VolumeLayout,
    /// The pool key's derived bytes, for the replica handshake.
    pub pool_key: [u8; 32],
    /// The node the worker runs on (its copies are read first).
    pub node: nodeos_types::NodeId,
    /// The worker's own credential for mutual TLS with the replicas; `None`
    /// on a plaintext (loopback) pool.
    #[serde(default)]
    pub tls: Option<WorkerTls>,
}

/// A VM worker's TLS credential (role worker: the replica protocol only) and
/// the CA certificates it trusts, PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for WorkerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerTls")
    }
}

impl std::fmt::Debug for VolumeDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeDisk")
            .field("volume", &self.layout.volume)
            .field("generation", &self.layout.generation)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    pub mac: [u8; 6],
    /// Index into the file descriptors passed with the config: a connected
    /// SOCK_SEQPACKET socket carrying one Ethernet frame per message.
    pub fd_index: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be 1..={MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    #[error("memory_mib must be {min}..={max}, got {got}")]
    Memory { got: u64, min: u64, max: u64 },
    #[error("cmdline is {0} bytes; the limit is {MAX_CMDLINE}")]
    Cmdline(usize),
    #[error("at most {MAX_DISKS} disks and {MAX_NICS} NICs, got {disks} and {nics}")]
    Devices { disks: usize, nics: usize },
    #[error("NIC {index} has MAC {mac}, which is multicast or all zero")]
    Mac { index: usize, mac: String },
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl WorkerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        let (min, max) = (crate::memory::MIN_MEMORY_MIB, crate::memory::MAX_MEMORY_MIB);
        if !(min..=max).contains(&self.memory_mib) {
            return Err(ConfigError::Memory { got: self.memory_mib, min, max });
        }
        if self.cmdline.len() > MAX_CMDLINE {
            return Err(ConfigError::Cmdline(self.cmdline.len()));
        }
        if self.disks.len() > MAX_DISKS || self.nics.len() > MAX_NICS {
            return Err(ConfigError::Devices { disks: self.disks.len(), nics: self.nics.len() });
        }
        for (index, n) in self.nics.iter().enumerate() {
            if n.mac[0] & 1 == 1 || n.mac == [0; 6] {
                return Err(ConfigError::Mac { index, mac: mac_string(&n.mac) });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> WorkerConfig {
        WorkerConfig {
            vm_id: "v".into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: "/k".into(),
            initrd: None,
            cmdline: String::new(),
            disks: vec![],
            nics: vec![NicConfig { mac: [0x52, 0x54, 0, 0, 0, 1], fd_index: 0 }],
            console_log: "/c".into(),
            cpu_baseline: None,
        }
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(cfg().validate().is_ok());
        assert_eq!(WorkerConfig { vcpus: 0, ..cfg() }.validate(), Err(ConfigError::Vcpus(0)));
        assert!(matches!(
            WorkerConfig { memory_mib: 1, ..cfg() }.validate(),
            Err(ConfigError::Memory { .. })
        ));
        let mut c = cfg();
        c.nics[0].mac = [1, 0, 0, 0, 0, 0];
        assert!(matches!(c.validate(), Err(ConfigError::Mac { .. })));
        assert_eq!(mac_string(&[0x52, 0x54, 0, 0xab, 0, 1]), "52:54:00:ab:00:01");
    }
}
