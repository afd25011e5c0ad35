//! The image API in process, over gRPC on loopback: a one-node metadata store
//! (`nodeos_meta::testing`), a replica server over an in-memory store, and
//! the image, VM and volume services as a node serves them. Uploads of a
//! kernel and an initrd, VMs that name them, and the refusals: a kernel that
//! does not boot, a hash that does not match, an image in use, a VM whose
//! initrd does not fit. No root, no KVM (no VM is started).

#![allow(clippy::unwrap_used)]

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nodeos_api::image::ImageApi;
use nodeos_api::vm::VmApi;
use nodeos_api::volume::VolumeApi;
use nodeos_block::replica::Replica;
use nodeos_block::store::mem::MemStore;
use nodeos_block::transport::TcpTransport;
use nodeos_compute::process::{Launched, Launcher, ProcessError};
use nodeos_compute::{Compute, ComputeConfig};
use nodeos_meta::testing::{TestPool, node_record, test_key};
use nodeos_network::Networks;
use nodeos_proto::v1 as pb;
use nodeos_proto::v1::image_service_client::ImageServiceClient;
use nodeos_proto::v1::image_service_server::ImageServiceServer;
use nodeos_proto::v1::upload_image_request::Msg;
use nodeos_proto::v1::vm_service_client::VmServiceClient;
use nodeos_proto::v1::vm_service_server::VmServiceServer;
use nodeos_proto::v1::volume_service_client::VolumeServiceClient;
use nodeos_proto::v1::volume_service_server::VolumeServiceServer;
use nodeos_switch::switch::SwitchHandle;
use nodeos_types::NodeId;
use nodeos_types::records::NodeRecord;
use nodeos_volumes::Volumes;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

const ME: NodeId = NodeId(1);

/// No VM starts in these tests.
#[derive(Debug)]
struct NoWorkers;

impl Launcher for NoWorkers {
    fn launch(&self, _control: OwnedFd, _log: std::fs::File) -> Result<Launched, ProcessError> {
        Err(ProcessError::Spawn(std::io::Error::other("no workers in this test")))
    }
}

/// A bzImage as the VMM's loader takes it (boot protocol 2.15, 64-bit entry,
/// loaded high, 20 MiB needed), built from boot.rst's header offsets.
fn bzimage() -> Vec<u8> {
    let mut img = vec![0u8; 5 * 512];
    let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[4]); // setup_sects
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes()); // version
    put(0x211, &[0x01]); // loadflags: LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(0x236, &0x03u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    put(0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(0x260, &0x40_0000u32.to_le_bytes()); // init_size
    img.extend_from_slice(&[0xf4; 0x2000]);
    img
}

struct Bed {
    _pool: TestPool,
    images: ImageServiceClient<Channel>,
    vms: VmServiceClient<Channel>,
    volumes: VolumeServiceClient<Channel>,
    _dir: tempfile::TempDir,
}

impl Bed {
    async fn new() -> Bed {
        let pool = TestPool::single().await.unwrap();
        let meta = pool.first();
        let replicas = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let block_address = replicas.local_addr().unwrap().to_string();
        let replica = Arc::new(Replica::new(Arc::new(MemStore::new())));
        tokio::spawn(nodeos_block::server::serve(
            replicas,
            replica,
            ME,
            test_key(),
            None,
            std::future::pending(),
        ));
        pool.put_node(&NodeRecord { block_address, ..node_record(ME) }).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(meta.clone(), TcpTransport::new(test_key()));
        let networks = Networks::new(meta.clone());
        let switch = SwitchHandle::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let compute = Compute::new(
            ComputeConfig {
                node_id: ME,
                state_dir: dir.path().join("vms"),
                pool_key: test_key(),
                migration_address: std::net::Ipv4Addr::LOCALHOST.into(),
                image_reboot: None,
                worker_tls: None,
                tls: None,
                host_paths: nodeos_compute::spec::HostPaths::Under("/".into()),
            },
            meta.clone(),
            volumes.clone(),
            networks.clone(),
            switch,
            Arc::new(NoWorkers),
        );
        let images = compute.images().clone();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", api.local_addr().unwrap());
        let incoming = tonic::transport::server::TcpIncoming::from(api);
        let server = tonic::transport::Server::builder()
            .add_service(
                ImageServiceServer::new(ImageApi::new(images.clone())).max_decoding_message_size(5 << 20),
            )
            .add_service(VmServiceServer::new(VmApi::new(compute, meta, networks)))
            .add_service(VolumeServiceServer::new(VolumeApi::new(volumes, images)))
            .serve_with_incoming(incoming);
        tokio::spawn(server);
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        Bed {
            _pool: pool,
            images: ImageServiceClient::new(channel.clone()).max_encoding_message_size(5 << 20),
            vms: VmServiceClient::new(channel.clone()),
            volumes: VolumeServiceClient::new(channel),
            _dir: dir,
        }
    }

    /// Uploads `bytes` in chunks of 1 MiB, announcing `total` bytes and `sha256`.
    async fn upload_as(
        &mut self,
        name: &str,
        kind: pb::ImageKind,
        bytes: &[u8],
        total: u64,
        sha256: &str,
    ) -> Result<pb::Image, tonic::Status> {
        let start = pb::UploadImageStart {
            name: name.into(),
            kind: kind as i32,
            total_bytes: total,
            sha256: sha256.into(),
        };
        let mut msgs = vec![pb::UploadImageRequest { msg: Some(Msg::Start(start)) }];
        msgs.extend(bytes.chunks(1 << 20).map(|c| pb::UploadImageRequest {
            msg: Some(Msg::Chunk(pb::UploadImageChunk { data: c.to_vec() })),
        }));
        self.images.upload(futures::stream::iter(msgs)).await.map(|r| r.into_inner())
    }

    async fn upload(
        &mut self,
        name: &str,
        kind: pb::ImageKind,
        bytes: &[u8],
    ) -> Result<pb::Image, tonic::Status> {
        let sha = hex::encode(Sha256::digest(bytes));
        self.upload_as(name, kind, bytes, bytes.len() as u64, &sha).await
    }

    async fn image_names(&mut self) -> Vec<String> {
        let all = self.images.list(pb::ListImagesRequest {}).await.unwrap().into_inner().images;
        all.into_iter().map(|i| i.name).collect()
    }

    /// Names of the volumes that are not being deleted.
    async fn live_volumes(&mut self) -> Vec<String> {
        let all = self.volumes.list(pb::ListVolumesRequest {}).await.unwrap().into_inner().volumes;
        all.into_iter().filter(|v| v.state == "available").map(|v| v.name).collect()
    }

    async fn create_vm(
        &mut self,
        name: &str,
        memory_mib: u64,
        kernel: &str,
        initrd: &str,
    ) -> Result<pb::Vm, tonic::Status> {
        let spec = pb::VmSpec {
            vcpus: 1,
            memory_mib,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: "console=ttyS0".into(),
            ..Default::default()
        };
        self.vms
            .create(pb::CreateVmRequest { ha: None, name: name.into(), spec: Some(spec) })
            .await
            .map(|r| r.into_inner())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_uploaded_checked_named_by_vms_and_kept_while_named() {
    let mut bed = Bed::new().await;
    let kernel = bzimage();
    let initrd: Vec<u8> = (0..(2 << 20) + 100).map(|i: u32| (i % 253) as u8).collect();

    let k = bed.upload("k", pb::ImageKind::Kernel, &kernel).await.unwrap();
    assert_eq!((k.kind, k.size_bytes), (pb::ImageKind::Kernel as i32, kernel.len() as u64));
    assert_eq!(k.sha256, hex::encode(Sha256::digest(&kernel)));
    assert_eq!(k.format, "bzImage, boot protocol 2.15");
    let i = bed.upload("i", pb::ImageKind::Initrd, &initrd).await.unwrap();
    assert_eq!((i.size_bytes, i.format.as_str()), (initrd.len() as u64, ""));
    let by_id = bed.images.get(pb::ImageRef { image: k.id.clone() }).await.unwrap().into_inner();
    assert_eq!(by_id, k);
    assert_eq!(bed.image_names().await, ["i", "k"]);
    let json = serde_json::to_value(&k).unwrap();
    assert_eq!(json["kind"], "kernel", "kinds print as words");

    let e = bed.upload("k", pb::ImageKind::Kernel, &kernel).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // A VM names the images (and volumes) by name or id; its record keeps the ids.
    let root = pb::CreateVolumeRequest { name: "root".into(), size_bytes: 1 << 20, replicas: 1 };
    let root = bed.volumes.create(root).await.unwrap().into_inner();
    let spec = pb::VmSpec {
        vcpus: 1,
        memory_mib: 256,
        kernel: "image:k".into(),
        initrd: format!("image:{}", i.id),
        cmdline: "console=ttyS0 root=/dev/vda rw".into(),
        disks: vec![pb::DiskSpec { volume: "root".into(), ..Default::default() }],
        ..Default::default()
    };
    let vm = bed
        .vms
        .create(pb::CreateVmRequest { ha: None, name: "web".into(), spec: Some(spec.clone()) })
        .await
        .expect("a VM of pool images is recorded");
    let got = vm.into_inner().spec.unwrap();
    assert_eq!((got.kernel, got.initrd), (format!("image:{}", k.id), format!("image:{}", i.id)));
    assert_eq!(got.disks[0].volume, root.id);
    let mut nowhere = spec;
    nowhere.disks[0].volume = "nope".into();
    let e = bed
        .vms
        .create(pb::CreateVmRequest { ha: None, name: "web2".into(), spec: Some(nowhere) })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "--disk volume:nope: no such volume in this pool")
    );

    // Named by a VM: neither the image nor its volume can go.
    let e = bed.images.delete(pb::ImageRef { image: "k".into() }).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::FailedPrecondition, "image k is used by VM web; delete the VM first")
    );
    let e = bed
        .volumes
        .delete(pb::DeleteVolumeRequest { volume: k.volume_id.clone(), force: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("holds image k"), "{e:?}");

    // Bad VMs are refused in the command line's words, and nothing is recorded.
    let e = bed.create_vm("small", 16, "image:k", "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "--kernel image \"k\" needs 20 MiB of guest memory below 3 GiB; a VM with 16 MiB of memory has 16 MiB"
    );
    let e = bed.create_vm("tight", 22, "image:k", "image:i").await.unwrap_err();
    assert_eq!(
        e.message(),
        "--initrd image \"i\" is 2.0 MiB (2097252 bytes); a VM with 22 MiB of memory takes at most 2 MiB beside its kernel"
    );
    let e = bed.create_vm("mixed", 256, "image:i", "").await.unwrap_err();
    assert_eq!(e.message(), "--kernel image \"i\" is an initrd image; --kernel takes a kernel image");
    let e = bed.create_vm("nowhere", 256, "image:nope", "").await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "--kernel image \"nope\": no such image in this pool")
    );
    let vms = bed.vms.list(pb::ListVmsRequest {}).await.unwrap().into_inner().vms;
    assert_eq!(vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(), ["web"]);

    // The VM gone, its images can go, with their volumes.
    bed.vms.delete(pb::VmRef { vm: "web".into() }).await.unwrap();
    bed.images.delete(pb::ImageRef { image: "k".into() }).await.unwrap();
    bed.images.delete(pb::ImageRef { image: i.id.clone() }).await.unwrap();
    bed.volumes.delete(pb::DeleteVolumeRequest { volume: "root".into(), force: false }).await.unwrap();
    assert!(bed.image_names().await.is_empty());
    assert!(bed.live_volumes().await.is_empty());
    let e = bed.images.get(pb::ImageRef { image: "k".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_naming_the_field_and_leave_nothing() {
    let mut bed = Bed::new().await;

    // Not a kernel: refused before a volume is made.
    let junk = vec![0x42u8; 8192];
    let e = bed.upload("junk", pb::ImageKind::Kernel, &junk).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("the kernel is not bootable: it is neither an ELF64 image nor a bzImage"),
        "{e:?}"
    );
    let mut old = bzimage();
    old[0x206..0x208].copy_from_slice(&0x0209u16.to_le_bytes());
    let e = bed.upload("old", pb::ImageKind::Kernel, &old).await.unwrap_err();
    assert!(
        e.message().ends_with("it is a bzImage of boot protocol 2.09; the VMM needs 2.10 or newer"),
        "{e:?}"
    );

    // A hash that does not match: the initrd's volume is deleted again.
    let initrd = vec![7u8; 3 << 20];
    let wrong = hex::encode(Sha256::digest(b"something else"));
    let e =
        bed.upload_as("i", pb::ImageKind::Initrd, &initrd, initrd.len() as u64, &wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with(&format!("start.sha256 is {wrong}, but the bytes received hash to ")),
        "{e:?}"
    );
    let e = bed
        .upload_as("k", pb::ImageKind::Kernel, &bzimage(), bzimage().len() as u64, &wrong)
        .await
        .unwrap_err();
    assert!(e.message().starts_with("start.sha256 is"), "{e:?}");

    // A stream that ends early, or carries more than it announced.
    let e =
        bed.upload_as("i", pb::ImageKind::Initrd, &initrd, initrd.len() as u64 + 1, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("ended after 3145728 of start.total_bytes"), "{e:?}");
    let e = bed.upload_as("i", pb::ImageKind::Initrd, &initrd, 4096, "").await.unwrap_err();
    assert!(e.message().contains("more than start.total_bytes"), "{e:?}");

    // Starts out of range.
    let e = bed.upload_as("i", pb::ImageKind::Initrd, &[], 0, "").await.unwrap_err();
    assert!(
        e.message().starts_with("start.total_bytes must be 1..=1073741824 (1024 MiB) for initrd images"),
        "{e:?}"
    );
    let e = bed.upload_as("k", pb::ImageKind::Kernel, &[], 65 << 20, "").await.unwrap_err();
    assert!(e.message().contains("(64 MiB)"), "{e:?}");
    let e = bed.upload_as("Bad", pb::ImageKind::Kernel, &[1], 1, "").await.unwrap_err();
    assert!(e.message().starts_with("start.name must be"), "{e:?}");
    let e = bed.upload_as("k", pb::ImageKind::Unspecified, &[1], 1, "").await.unwrap_err();
    assert_eq!(e.message(), "start.kind must be kernel or initrd, got 0");

    assert!(bed.image_names().await.is_empty(), "no image from a refused upload");
    assert!(bed.live_volumes().await.is_empty(), "no volume from a refused upload");
}
