//! [`WriterSlot`]: the one way to hold a volume's writer slot.
//!
//! Acquiring a slot takes a new generation by compare-and-swap on the
//! volume's record and names the holder (`vm <id>`, `nbd`, `import`); the
//! holder's client records that generation on the replicas, which then refuse
//! every older writer. The slot is given back by [`WriterSlot::release`], or,
//! if its owner forgets, when it drops (on the current tokio runtime, in the
//! background). Giving back is conditional: a slot whose ownership moved on (a
//! takeover, an operator's `volume release`) leaves the new owner alone, and
//! its old holder is fenced by the replicas whatever it still sends.
//!
//! VM disks (compute), NBD exports and image imports all hold their volumes
//! through this type, so no path opens a writer without giving it back.

use nodeos_block::client::VolumeClient;
use nodeos_block::transport::{TcpTransport, Transport};
use nodeos_types::records::VolumeRecord;
use nodeos_types::{NodeId, VolumeId};
use tracing::{info, warn};

use crate::volumes::{VolumeError, Volumes};

/// What to do when another writer holds the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Refuse with [`VolumeError::InUse`].
    Refuse,
    /// Take over only from a holder of the same name (this VM's own earlier
    /// worker, crashed or on a dead node); refuse anyone else.
    OwnHolder,
    /// Take over from anyone (the operator asked); the old writer is fenced.
    Force,
}

/// A held writer slot of one volume. See the module docs.
#[derive(Debug)]
pub struct WriterSlot<T: Transport + Clone = TcpTransport> {
    volumes: Volumes<T>,
    volume: VolumeId,
    holder: String,
    generation: u64,
    released: bool,
}

impl<T: Transport + Clone> WriterSlot<T> {
    /// Takes the writer slot of `volume` (name or id) for `holder` on `node`.
    /// Answers the slot and the record as written.
    pub async fn acquire(
        volumes: &Volumes<T>,
        volume: &str,
        node: NodeId,
        holder: &str,
        takeover: Takeover,
    ) -> Result<(Self, VolumeRecord), VolumeError> {
        let force = takeover == Takeover::Force;
        let r = match volumes.open_writer(volume, node, holder, force).await {
            Err(VolumeError::InUse { holder: h, .. }) if takeover == Takeover::OwnHolder && h == holder => {
                volumes.open_writer(volume, node, holder, true).await?
            }
            other => other?,
        };
        let slot = WriterSlot {
            volumes: volumes.clone(),
            volume: r.id,
            holder: holder.to_owned(),
            generation: r.generation,
            released: false,
        };
        Ok((slot, r))
    }

    /// Takes the slot and opens this process's client on it: the client
    /// fences older writers on the replicas before it answers, and follows
    /// the volume's record while it lives. On failure nothing stays held.
    pub async fn open(
        volumes: &Volumes<T>,
        volume: &str,
        holder: &str,
        takeover: Takeover,
    ) -> Result<(VolumeClient<T>, Self), VolumeError> {
        let me = volumes.meta().node_id();
        let (slot, r) = Self::acquire(volumes, volume, me, holder, takeover).await?;
        let opened = async {
            let layout = volumes.layout(&r).await?;
            Ok::<_, VolumeError>(
                VolumeClient::open(volumes.transport().clone(), layout, false, Some(me)).await?,
            )
        }
        .await;
        match opened {
            Ok(client) => {
                volumes.follow(&client, r.id, Some(slot.generation));
                Ok((client, slot))
            }
            Err(e) => {
                if let Err(back) = slot.release().await {
                    warn!(volume = %r.id, error = %nodeos_types::error_chain(&back), "cannot give the writer slot back after a failed open");
                }
                Err(e)
            }
        }
    }

    pub fn volume(&self) -> VolumeId {
        self.volume
    }

    /// The generation this slot was taken with (its token in the record).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether this slot still holds the volume (no takeover or release since).
    pub async fn held(&self) -> Result<bool, VolumeError> {
        let (r, _) = self.volumes.get(&self.volume.to_string()).await?;
        Ok(r.writer.is_some_and(|w| w.token == self.generation))
    }

    /// Gives the slot back now, if it still holds the volume.
    pub async fn release(mut self) -> Result<(), VolumeError> {
        self.released = true;
        self.volumes.close_writer(self.volume, self.generation).await
    }
}

impl<T: Transport + Clone> Drop for WriterSlot<T> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let (volumes, volume, generation) = (self.volumes.clone(), self.volume, self.generation);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    match volumes.close_writer(volume, generation).await {
                        Ok(()) => info!(volume = %volume, generation, "writer slot given back"),
                        Err(e) => warn!(
                            volume = %volume,
                            generation,
                            error = %nodeos_types::error_chain(&e),
                            "cannot give the writer slot back; `nodeos volume release` frees it"
                        ),
                    }
                });
            }
            Err(_) => warn!(
                volume = %volume,
                generation,
                "writer slot dropped outside a runtime; `nodeos volume release` frees it"
            ),
        }
    }
}
