//! [`PxeAgent`]: serves PXE on this node when the pool's settings say so.
//!
//! The agent owns the [`PxeServer`] and the prepared image. It reads the `pxe` record (a local
//! read), and on every change of it, every 30 s and after a failure, makes the node match:
//! off, preparing (the image is rebuilt on a blocking thread, once per boot), serving, or
//! failed with the reason (retried). The API asks it for its state through a [`PxeHandle`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use nodeos_image::boot_ipxe;
use nodeos_image::hash::{INITRAMFS_FILE, IPXE_FILE, KERNEL_FILE};
use nodeos_meta::{Consistency, MetaHandle};
use nodeos_types::NodeId;
use nodeos_types::records::{PXE_KEY, PxeSettingsRecord};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::server::{PxeConfig, PxeServer, PxeStats};
use crate::source::{ImageSource, ServedImage};
use crate::{Bundle, BundleError};

/// Checks again this often even without events (a failed start is retried then).
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// A failed image preparation is tried again after this long.
const PREPARE_RETRY: Duration = Duration::from_secs(300);

/// What the agent is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ServeState {
    #[default]
    Off,
    Preparing(String),
    Serving,
    Failed(String),
}

impl ServeState {
    pub fn name(&self) -> &'static str {
        match self {
            ServeState::Off => "off",
            ServeState::Preparing(_) => "preparing",
            ServeState::Serving => "serving",
            ServeState::Failed(_) => "failed",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            ServeState::Preparing(d) | ServeState::Failed(d) => d,
            ServeState::Off | ServeState::Serving => "",
        }
    }
}

/// One node's PXE state, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodePxeStatus {
    pub state: ServeState,
    pub interface: String,
    pub address: String,
    pub image_hash: String,
    pub stats: PxeStats,
}

/// Cloneable handle to the agent task.
#[derive(Debug, Clone)]
pub struct PxeHandle {
    tx: mpsc::Sender<oneshot::Sender<NodePxeStatus>>,
}

impl PxeHandle {
    /// The agent's state; `None` once it has stopped.
    pub async fn status(&self) -> Option<NodePxeStatus> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(tx).await.ok()?;
        rx.await.ok()
    }
}

#[derive(Debug, Clone)]
pub struct PxeAgentConfig {
    pub node_id: NodeId,
    pub pool_name: String,
    /// The pool key's text, for the machines booted; `None`: it cannot be put on a kernel
    /// command line (the agent then refuses to serve, and says why).
    pub pool_key: Option<String>,
    /// This node's API address: the booted machines' seed, and (by its IP) the interface
    /// served on when the settings name none.
    pub advertise: SocketAddr,
    pub source: ImageSource,
}

/// Whether a pool key can travel as `nodeos.key=` on a kernel command line.
pub fn cmdline_safe_key(text: &str) -> Option<String> {
    let key = text.trim();
    (!key.is_empty() && key.bytes().all(|b| b.is_ascii_graphic() && b != b'$' && b != b'"'))
        .then(|| key.to_owned())
}

/// The boot script for the machines this node boots: the image's own arguments, then what makes
/// them join this pool (its name, key and this node as seed), then the operator's `append`.
pub fn boot_script(img: &ServedImage, pool: &str, key: &str, seed: SocketAddr, append: &str) -> String {
    let extra = [format!("nodeos.pool={pool}"), format!("nodeos.key={key}"), format!("nodeos.seeds={seed}")]
        .into_iter()
        .chain((!append.trim().is_empty()).then(|| append.trim().to_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    boot_ipxe(&img.cmdline, &img.image_hash, &extra)
}

pub fn bundle_for(img: &ServedImage, script: &str) -> Result<Bundle, BundleError> {
    let mut b = Bundle::new();
    b.insert(KERNEL_FILE, img.kernel.clone())?;
    b.insert(INITRAMFS_FILE, img.initramfs.clone())?;
    b.insert(IPXE_FILE, bytes::Bytes::from(script.to_owned()))?;
    for (name, data) in &img.chainloaders {
        b.insert(name, data.clone())?;
    }
    Ok(b)
}

/// The interface to serve on and its IPv4 address: the named one, or the one holding `ip`.
pub fn resolve_interface(named: &str, ip: IpAddr) -> Result<(String, Ipv4Addr), String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list interfaces: {e}"))?;
    let v4: Vec<(String, Ipv4Addr)> = addrs
        .filter_map(|a| {
            let sin = a.address.as_ref()?.as_sockaddr_in()?;
            Some((a.interface_name, sin.ip()))
        })
        .collect();
    if named.is_empty() {
        let IpAddr::V4(want) = ip else { return Err(format!("the advertised address {ip} is not IPv4")) };
        v4.into_iter().find(|(_, a)| *a == want).ok_or_else(|| {
            format!("no interface holds the advertised address {want}; name one in the PXE settings")
        })
    } else {
        v4.into_iter()
            .find(|(n, _)| n == named)
            .ok_or_else(|| format!("interface {named} does not exist or has no IPv4 address"))
    }
}

struct Serving {
    settings: PxeSettingsRecord,
    server: PxeServer,
}

pub struct PxeAgent {
    cfg: PxeAgentConfig,
    meta: MetaHandle,
    requests: mpsc::Receiver<oneshot::Sender<NodePxeStatus>>,
    status: NodePxeStatus,
    image: Option<Arc<ServedImage>>,
    preparing: Option<oneshot::Receiver<Result<ServedImage, String>>>,
    prepare_failed: Option<(String, Instant)>,
    serving: Option<Serving>,
}

impl std::fmt::Debug for PxeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PxeAgent")
            .field("cfg", &self.cfg)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl PxeAgent {
    pub fn new(cfg: PxeAgentConfig, meta: MetaHandle) -> (Self, PxeHandle) {
        let (tx, requests) = mpsc::channel(16);
        let agent = PxeAgent {
            cfg,
            meta,
            requests,
            status: NodePxeStatus::default(),
            image: None,
            preparing: None,
            prepare_failed: None,
            serving: None,
        };
        (agent, PxeHandle { tx })
    }

    async fn settings(&self) -> (PxeSettingsRecord, u64) {
        match self.meta.get(PXE_KEY, Consistency::Local).await {
            Ok((Some(kv), rev)) => match serde_json::from_slice(&kv.value) {
                Ok(s) => (s, rev),
                Err(e) => {
                    warn!(error = %e, "the pxe record does not decode: not serving");
                    (PxeSettingsRecord::default(), rev)
                }
            },
            Ok((None, rev)) => (PxeSettingsRecord::default(), rev),
            Err(e) => {
                debug!(error = %e, "cannot read the pxe record");
                (PxeSettingsRecord::default(), 0)
            }
        }
    }

    fn set_state(&mut self, state: ServeState) {
        if state != self.status.state {
            match &state {
                ServeState::Failed(why) => warn!(reason = %why, "PXE: not serving"),
                ServeState::Preparing(what) => info!(doing = %what, "PXE: preparing"),
                ServeState::Serving => {}
                ServeState::Off => info!("PXE: off"),
            }
        }
        self.status.state = state;
    }

    async fn stop_serving(&mut self) {
        if let Some(s) = self.serving.take() {
            s.server.stop().await;
        }
    }

    /// Moves one step towards what `settings` ask of this node.
    async fn reconcile(&mut self, settings: &PxeSettingsRecord) {
        if !settings.serves(self.cfg.node_id) {
            self.stop_serving().await;
            self.set_state(ServeState::Off);
            return;
        }
        let Some(key) = self.cfg.pool_key.clone() else {
            self.set_state(ServeState::Failed(
                "the pool key holds spaces, quotes or `$`: it cannot be passed on a kernel command line"
                    .into(),
            ));
            return;
        };
        let Some(image) = self.image.clone() else {
            if self.preparing.is_some() {
                return;
            }
            if let ImageSource::Unavailable(why) = &self.cfg.source {
                let why = why.clone();
                return self.set_state(ServeState::Failed(why));
            }
            if let Some((why, at)) = &self.prepare_failed
                && at.elapsed() < PREPARE_RETRY
            {
                let why = why.clone();
                self.set_state(ServeState::Failed(why));
                return;
            }
            let source = self.cfg.source.clone();
            let (tx, rx) = oneshot::channel();
            // Its own thread at the lowest priority: compressing the image takes a core for
            // seconds (minutes under emulation), and raft heartbeats must not wait for it.
            let spawned = std::thread::Builder::new().name("pxe-image".into()).spawn(move || {
                // SAFETY: setpriority on this thread's own id; no memory is passed.
                let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
                let _ = tx.send(source.prepare().map_err(|e| nodeos_types::error_chain(&e)));
            });
            if let Err(e) = spawned {
                return self
                    .set_state(ServeState::Failed(format!("cannot start the image preparation: {e}")));
            }
            self.preparing = Some(rx);
            self.set_state(ServeState::Preparing("rebuilding and checking the image to serve".into()));
            return;
        };
        if self.serving.as_ref().is_some_and(|s| s.settings == *settings) {
            return;
        }
        self.stop_serving().await;
        let (iface, ip) = match resolve_interface(&settings.interface, self.cfg.advertise.ip()) {
            Ok(x) => x,
            Err(why) => return self.set_state(ServeState::Failed(why)),
        };
        let script = boot_script(&image, &self.cfg.pool_name, &key, self.cfg.advertise, &settings.append);
        let bundle = match bundle_for(&image, &script) {
            Ok(b) => Arc::new(b),
            Err(e) => return self.set_state(ServeState::Failed(e.to_string())),
        };
        let mut pxe = PxeConfig::new(iface.clone(), ip);
        pxe.http_port = settings.http_port();
        match PxeServer::start(pxe, bundle).await {
            Ok(server) => {
                info!(interface = %iface, address = %ip, image = %image.image_hash, "PXE: serving this node's image");
                self.status.interface = iface;
                self.status.address = ip.to_string();
                self.serving = Some(Serving { settings: settings.clone(), server });
                self.set_state(ServeState::Serving);
            }
            Err(e) => self.set_state(ServeState::Failed(nodeos_types::error_chain(&e))),
        }
    }

    fn snapshot(&self) -> NodePxeStatus {
        let mut s = self.status.clone();
        if let Some(srv) = &self.serving {
            s.stats = srv.server.stats();
        }
        s
    }

    /// Runs until `stop` resolves.
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let (settings, rev) = self.settings().await;
            self.reconcile(&settings).await;
            let from = if rev == 0 { 0 } else { rev + 1 };
            let mut events = self.meta.watch(from, PXE_KEY.to_owned()).boxed();
            let deadline = tokio::time::sleep(RESYNC_EVERY);
            tokio::pin!(deadline);
            // Status requests are answered without leaving the inner loop; anything else
            // re-reads the settings.
            loop {
                tokio::select! {
                    _ = &mut stop => {
                        self.stop_serving().await;
                        return;
                    }
                    Some(reply) = self.requests.recv() => {
                        let _ = reply.send(self.snapshot());
                        continue;
                    }
                    done = async { self.preparing.as_mut().expect("guarded by the branch condition").await },
                        if self.preparing.is_some() =>
                    {
                        self.preparing = None;
                        match done {
                            Ok(Ok(image)) => {
                                self.status.image_hash = image.image_hash.clone();
                                self.image = Some(Arc::new(image));
                                self.prepare_failed = None;
                            }
                            Ok(Err(why)) => self.prepare_failed = Some((why, Instant::now())),
                            Err(_) => {
                                self.prepare_failed =
                                    Some(("the image preparation thread ended without an answer".into(), Instant::now()));
                            }
                        }
                    }
                    _ = &mut deadline => {}
                    ev = events.next() => {
                        if let Some(Err(e)) = &ev {
                            debug!(error = %e, "pxe watch ended; reading again");
                        }
                        if !matches!(ev, Some(Ok(_))) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ServedImage {
        ServedImage {
            kernel: bytes::Bytes::from_static(b"k"),
            initramfs: bytes::Bytes::from_static(b"i"),
            cmdline: "console=ttyS0 quiet".into(),
            image_hash: "ab12".into(),
            chainloaders: vec![("undionly.kpxe".into(), bytes::Bytes::from_static(b"ipxe"))],
        }
    }

    #[test]
    fn the_boot_script_makes_the_machine_join_this_pool() {
        let seed: SocketAddr = "10.0.0.2:7700".parse().unwrap();
        let script = boot_script(&image(), "lab", "k3y-0123456789abcdef", seed, " nodeos.dns=10.0.0.53 ");
        assert_eq!(
            script,
            "#!ipxe\n# nodeos image ab12\nkernel vmlinuz console=ttyS0 quiet nodeos.image=ab12 nodeos.pool=lab \
             nodeos.key=k3y-0123456789abcdef nodeos.seeds=10.0.0.2:7700 nodeos.dns=10.0.0.53 initrd=initramfs.img\n\
             initrd initramfs.img\nboot\n"
        );
        let b = bundle_for(&image(), &script).unwrap();
        assert_eq!(b.get("boot.ipxe").map(|s| s.as_ref()), Some(script.as_bytes()));
        assert_eq!(b.get("vmlinuz").map(|s| s.as_ref()), Some(&b"k"[..]));
        assert_eq!(b.get("undionly.kpxe").map(|s| s.as_ref()), Some(&b"ipxe"[..]));
    }

    #[test]
    fn keys_that_a_command_line_cannot_carry_are_refused() {
        assert_eq!(cmdline_safe_key(" 0123456789abcdef\n").as_deref(), Some("0123456789abcdef"));
        assert_eq!(cmdline_safe_key("two words here!!"), None);
        assert_eq!(cmdline_safe_key("dollar$0123456789"), None);
        assert_eq!(cmdline_safe_key(""), None);
    }

    #[test]
    fn the_interface_is_found_by_name_or_by_address() {
        let (name, ip) = resolve_interface("lo", "127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!((name.as_str(), ip), ("lo", Ipv4Addr::LOCALHOST));
        assert_eq!(resolve_interface("", "127.0.0.1".parse().unwrap()).unwrap().0, "lo");
        let err = resolve_interface("", "192.0.2.99".parse().unwrap()).unwrap_err();
        assert!(err.contains("no interface holds the advertised address 192.0.2.99"), "{err}");
        let err = resolve_interface("nosuch0", "127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(err.contains("interface nosuch0 does not exist"), "{err}");
    }
}
