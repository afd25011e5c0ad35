//! The role every RPC needs. An RPC not in this table is denied to everyone:
//! a method added to a .proto file stays closed until it is given a row here
//! (a test walks the descriptors to say which rows are missing).

use crate::identity::Role;

/// Whether a call changes the pool (and so goes to the audit trail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Reads,
    Changes,
}

use Effect::{Changes, Reads};
use Role::{Admin, Node, Operator, Reader};

/// `(path, role needed, effect)` for every RPC served on the API port.
pub const TABLE: &[(&str, Role, Effect)] = &[
    ("/nodeos.v1.PoolService/Status", Reader, Reads),
    ("/nodeos.v1.PoolService/ListNodes", Reader, Reads),
    ("/nodeos.v1.PoolService/GetNode", Reader, Reads),
    ("/nodeos.v1.PoolService/Watch", Reader, Reads),
    ("/nodeos.v1.PoolService/Upgrade", Admin, Changes),
    ("/nodeos.v1.MetadataService/Get", Reader, Reads),
    ("/nodeos.v1.MetadataService/List", Reader, Reads),
    ("/nodeos.v1.MetadataService/Watch", Reader, Reads),
    ("/nodeos.v1.MetadataService/Put", Operator, Changes),
    ("/nodeos.v1.MetadataService/Delete", Operator, Changes),
    ("/nodeos.v1.VmService/Get", Reader, Reads),
    ("/nodeos.v1.VmService/List", Reader, Reads),
    ("/nodeos.v1.VmService/Create", Operator, Changes),
    ("/nodeos.v1.VmService/Start", Operator, Changes),
    ("/nodeos.v1.VmService/Stop", Operator, Changes),
    ("/nodeos.v1.VmService/Pause", Operator, Changes),
    ("/nodeos.v1.VmService/Resume", Operator, Changes),
    ("/nodeos.v1.VmService/Delete", Operator, Changes),
    // Typing into a guest's console acts on it.
    ("/nodeos.v1.VmService/Console", Operator, Changes),
    ("/nodeos.v1.VmService/Migrate", Operator, Changes),
    ("/nodeos.v1.VmService/SetHa", Operator, Changes),
    ("/nodeos.v1.VolumeService/List", Reader, Reads),
    ("/nodeos.v1.VolumeService/Get", Reader, Reads),
    ("/nodeos.v1.VolumeService/ListSnapshots", Reader, Reads),
    ("/nodeos.v1.VolumeService/Create", Operator, Changes),
    ("/nodeos.v1.VolumeService/Resize", Operator, Changes),
    ("/nodeos.v1.VolumeService/Delete", Operator, Changes),
    ("/nodeos.v1.VolumeService/CreateSnapshot", Operator, Changes),
    ("/nodeos.v1.VolumeService/DeleteSnapshot", Operator, Changes),
    ("/nodeos.v1.VolumeService/Clone", Operator, Changes),
    ("/nodeos.v1.VolumeService/Release", Operator, Changes),
    ("/nodeos.v1.VolumeService/Scrub", Operator, Changes),
    ("/nodeos.v1.VolumeService/Import", Operator, Changes),
    ("/nodeos.v1.ImageService/List", Reader, Reads),
    ("/nodeos.v1.ImageService/Get", Reader, Reads),
    ("/nodeos.v1.ImageService/Upload", Operator, Changes),
    ("/nodeos.v1.ImageService/Delete", Operator, Changes),
    ("/nodeos.v1.NetworkService/ListNetworks", Reader, Reads),
    ("/nodeos.v1.NetworkService/GetNetwork", Reader, Reads),
    ("/nodeos.v1.NetworkService/ListPorts", Reader, Reads),
    ("/nodeos.v1.NetworkService/GetPort", Reader, Reads),
    ("/nodeos.v1.NetworkService/ListSecurityGroups", Reader, Reads),
    ("/nodeos.v1.NetworkService/GetSecurityGroup", Reader, Reads),
    ("/nodeos.v1.NetworkService/GetSwitch", Reader, Reads),
    ("/nodeos.v1.NetworkService/CreateNetwork", Operator, Changes),
    ("/nodeos.v1.NetworkService/UpdateNetwork", Operator, Changes),
    ("/nodeos.v1.NetworkService/DeleteNetwork", Operator, Changes),
    ("/nodeos.v1.NetworkService/CreatePort", Operator, Changes),
    ("/nodeos.v1.NetworkService/SetPortSecurity", Operator, Changes),
    ("/nodeos.v1.NetworkService/DeletePort", Operator, Changes),
    ("/nodeos.v1.NetworkService/CreateSecurityGroup", Operator, Changes),
    ("/nodeos.v1.NetworkService/ChangeRules", Operator, Changes),
    ("/nodeos.v1.NetworkService/DeleteSecurityGroup", Operator, Changes),
    ("/nodeos.v1.NodeService/Power", Admin, Changes),
    ("/nodeos.v1.NodeService/Maintenance", Admin, Changes),
    ("/nodeos.v1.NodeService/Remove", Admin, Changes),
    ("/nodeos.v1.PxeService/Status", Reader, Reads),
    ("/nodeos.v1.PxeService/Configure", Admin, Changes),
    ("/nodeos.v1.AuthService/WhoAmI", Reader, Reads),
    ("/nodeos.v1.AuthService/List", Admin, Reads),
    ("/nodeos.v1.AuthService/Issue", Admin, Changes),
    ("/nodeos.v1.AuthService/Revoke", Admin, Changes),
    ("/nodeos.v1.AuditService/List", Admin, Reads),
    ("/nodeos.v1.PeerService/AppendEntries", Node, Reads),
    ("/nodeos.v1.PeerService/Vote", Node, Reads),
    ("/nodeos.v1.PeerService/InstallSnapshot", Node, Reads),
    ("/nodeos.v1.PeerService/Hello", Node, Reads),
    ("/nodeos.v1.PeerService/Join", Node, Reads),
    ("/nodeos.v1.PeerService/Forward", Node, Reads),
    ("/nodeos.v1.PeerService/Migration", Node, Reads),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", Reader, Reads),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", Reader, Reads),
];

/// The role `path` needs and what it does; `None`: no such RPC, denied.
pub fn lookup(path: &str) -> Option<(Role, Effect)> {
    TABLE.iter().find(|(p, _, _)| *p == path).map(|(_, r, e)| (*r, *e))
}

/// The RPC's short name, `Service/Method`, for messages and the audit trail.
pub fn short(path: &str) -> &str {
    let p = path.trim_start_matches('/');
    p.strip_prefix("nodeos.v1.").unwrap_or(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rpc_is_listed_once() {
        let mut seen = std::collections::BTreeSet::new();
        for (p, _, _) in TABLE {
            assert!(seen.insert(*p), "{p} twice");
        }
        assert_eq!(lookup("/nodeos.v1.VmService/Create"), Some((Operator, Changes)));
        assert_eq!(lookup("/nodeos.v1.VmService/Nope"), None);
        assert_eq!(short("/nodeos.v1.VmService/Create"), "VmService/Create");
    }

    #[test]
    fn only_nodes_speak_the_peer_protocol() {
        for (p, r, _) in TABLE {
            assert_eq!(p.contains("PeerService"), *r == Node, "{p}");
        }
    }
}
