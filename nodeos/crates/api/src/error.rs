//! Errors to gRPC `Status`: the only place this mapping lives.

use nodeos_block::device::DeviceError;
use nodeos_compute::images::ImageError;
use nodeos_meta::MetaError;
use nodeos_meta::WatchError;
use nodeos_network::NetworkError;
use nodeos_volumes::VolumeError;
use nodeos_volumes::import::ImportError;
use tonic::Status;

/// Maps a metadata store error to the status a client can act on.
pub fn meta_status(e: MetaError) -> Status {
    match &e {
        MetaError::Invalid(c) => Status::invalid_argument(c.to_string()),
        MetaError::NoLeader(_) | MetaError::LeaderUnreachable(_) | MetaError::Stopped(_) => {
            Status::unavailable(chain(&e))
        }
        MetaError::Indeterminate(_) => {
            Status::unavailable(format!("{}; retry with a compare-and-swap to stay safe", chain(&e)))
        }
        MetaError::Watch(w) => watch_status(w),
        MetaError::AlreadyInitialized => Status::already_exists(e.to_string()),
        MetaError::Refused(_) | MetaError::Membership(_) => Status::failed_precondition(chain(&e)),
        MetaError::Storage(_) | MetaError::Config(_) | MetaError::Dir(..) => Status::internal(chain(&e)),
    }
}

/// Maps a volume error to the status a client can act on.
pub fn volume_status(e: VolumeError) -> Status {
    match e {
        VolumeError::NotFound(_) | VolumeError::NoSnapshot { .. } => Status::not_found(chain(&e)),
        VolumeError::NameTaken(_) | VolumeError::SnapshotTaken { .. } => Status::already_exists(chain(&e)),
        VolumeError::Name(_)
        | VolumeError::Size { .. }
        | VolumeError::Replicas(_)
        | VolumeError::Shrink { .. } => Status::invalid_argument(chain(&e)),
        VolumeError::TooLarge { .. } => Status::resource_exhausted(chain(&e)),
        VolumeError::InUse { .. } | VolumeError::HasClones { .. } | VolumeError::NoNodes => {
            Status::failed_precondition(chain(&e))
        }
        VolumeError::Conflict => Status::aborted(chain(&e)),
        VolumeError::Meta(m) => meta_status(*m),
        VolumeError::Device(d) => device_status(&d),
        _ => Status::internal(chain(&e)),
    }
}

/// Maps an import's error: the stream's own faults are the caller's.
pub fn import_status(e: ImportError) -> Status {
    match e {
        ImportError::Invalid(msg) => Status::invalid_argument(msg),
        ImportError::Volume(v) => volume_status(v),
        ImportError::Write(d) => device_status(&d),
        ImportError::Task(_) => Status::internal(chain(&e)),
    }
}

/// Maps an image error: the upload's faults and bad bytes are the caller's.
pub fn image_status(e: ImageError) -> Status {
    match e {
        ImageError::Invalid(_)
        | ImageError::NotBootable(_)
        | ImageError::Sha256 { .. }
        | ImageError::Kind { .. } => Status::invalid_argument(chain(&e)),
        ImageError::NotFound(_) => Status::not_found(chain(&e)),
        ImageError::NameTaken(_) => Status::already_exists(chain(&e)),
        ImageError::InUse { .. } => Status::failed_precondition(chain(&e)),
        ImageError::Conflict => Status::aborted(chain(&e)),
        ImageError::Corrupt { .. } => Status::data_loss(chain(&e)),
        ImageError::Volume(v) => volume_status(*v),
        ImageError::Write(i) => import_status(i),
        ImageError::Read(d) => device_status(&d),
        ImageError::Meta(m) => meta_status(*m),
        ImageError::Io { .. } | ImageError::Record(_) => Status::internal(chain(&e)),
    }
}

/// Maps a network, port or security group error to the status a client can act on.
pub fn network_status(e: NetworkError) -> Status {
    match e {
        // No VNI left to hand out.
        NetworkError::Full(_) | NetworkError::Vni(0) => Status::resource_exhausted(chain(&e)),
        NetworkError::NoNetwork(_)
        | NetworkError::NoPort(_)
        | NetworkError::NoSecurityGroup(_)
        | NetworkError::NoNode(_)
        | NetworkError::NoRule { .. } => Status::not_found(chain(&e)),
        NetworkError::NameTaken { .. }
        | NetworkError::VniTaken(_)
        | NetworkError::IfnameTaken { .. }
        | NetworkError::MacTaken { .. }
        | NetworkError::IpTaken { .. } => Status::already_exists(chain(&e)),
        NetworkError::Name { .. }
        | NetworkError::Vni(_)
        | NetworkError::Cidr(_)
        | NetworkError::NotInNetwork { .. }
        | NetworkError::Mtu(_)
        | NetworkError::Lease(_)
        | NetworkError::Vtep(_)
        | NetworkError::Ifname(_)
        | NetworkError::Mac(_)
        | NetworkError::TooManyGroups
        | NetworkError::TooManyRules => Status::invalid_argument(chain(&e)),
        NetworkError::HasPorts { .. } | NetworkError::GroupInUse { .. } => {
            Status::failed_precondition(chain(&e))
        }
        NetworkError::Conflict => Status::aborted(chain(&e)),
        NetworkError::Meta(m) => meta_status(*m),
        NetworkError::Record(_) => Status::internal(chain(&e)),
    }
}

/// Maps a block device error (a volume opened in this process) to a status.
pub fn device_status(e: &DeviceError) -> Status {
    match e {
        DeviceError::Fenced { .. } => Status::failed_precondition(chain(e)),
        DeviceError::Unavailable(_) => Status::unavailable(chain(e)),
        DeviceError::OutOfRange { .. } | DeviceError::Misaligned { .. } => Status::invalid_argument(chain(e)),
        _ => Status::internal(chain(e)),
    }
}

pub fn watch_status(e: &WatchError) -> Status {
    match e {
        WatchError::Compacted { .. } => Status::out_of_range(e.to_string()),
        WatchError::Lagged { .. } => Status::aborted(e.to_string()),
        #[allow(unreachable_patterns)]
        _ => Status::internal(e.to_string()),
    }
}

/// Error message with its causes, for the client's one-line error.
pub fn chain(e: &dyn std::error::Error) -> String {
    nodeos_types::error_chain(e)
}
