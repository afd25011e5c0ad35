//! The destination's side: fill the waiting VM's memory, restore its state,
//! and say so. The VM does not run here: it starts when the hand-over is
//! committed ([`crate::vm::Vm::start_incoming`]).
//!
//! The stream is hostile input: frames are authenticated, but a source with
//! the pool key could still be buggy, so every page address must be a whole
//! page of this VM's RAM, every length must match its frame, the layout must
//! be this VM's, and the state must restore cleanly; anything else ends the
//! migration here with an `Abort` to the source, which keeps running.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use nodeos_types::auth::PoolKey;
use tracing::info;

use super::pages::{MemoryFile, PAGE};
use super::wire::{self, Channel, Kind};
use super::{MigrationError, Progress};
use crate::vm::{Layout, Vm, VmState};

fn lock(vm: &Mutex<Vm>) -> std::sync::MutexGuard<'_, Vm> {
    vm.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a receive brought in.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub passes: u32,
    pub pages: u64,
    pub zero_pages: u64,
}

/// Receives the VM over `stream` into `vm` (built with
/// [`Vm::build_incoming`]); on success its state is restored and the
/// source has been told. The channel is returned so the caller can keep
/// the connection open until the hand-over is decided.
pub fn receive<S: Read + Write>(
    vm: &Arc<Mutex<Vm>>,
    stream: S,
    vm_id: &str,
    pool_key: &PoolKey,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Channel<S>, Received), MigrationError> {
    let mut chan = Channel::accept(stream, pool_key, vm_id)?;
    match receive_on(vm, &mut chan, progress) {
        Ok(r) => Ok((chan, r)),
        Err(e) => {
            let why = nodeos_types::error_chain(&e);
            let _ = chan.send(Kind::Abort, &[why.as_bytes()]);
            let _ = chan.flush();
            Err(e)
        }
    }
}

fn receive_on<S: Read + Write>(
    vm: &Arc<Mutex<Vm>>,
    chan: &mut Channel<S>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Received, MigrationError> {
    let (ours, file) = {
        let v = lock(vm);
        let (_, mem) = v.memory();
        (v.layout().clone(), MemoryFile::new(&mem).map_err(wire::WireError::Io)?)
    };
    let mut buf = Vec::new();
    match chan.recv(&mut buf)? {
        Kind::Layout => {
            let theirs: Layout = postcard::from_bytes(&buf).map_err(MigrationError::StateDecode)?;
            if theirs != ours {
                return Err(MigrationError::Layout {
                    source_layout: format!("{theirs:?}"),
                    destination_layout: format!("{ours:?}"),
                });
            }
        }
        Kind::Abort => return Err(MigrationError::PeerAborted(String::from_utf8_lossy(&buf).into_owned())),
        other => return Err(MigrationError::Unexpected(other)),
    }
    // Pages written so far: a later zero range must clear them, while pages
    // never written are still zero (holes of the fresh memfd) and stay holes.
    let pages_total = (file.len() / PAGE) as usize;
    let mut written = vec![0u64; pages_total.div_ceil(64)];
    let index_of = |gpa: u64| -> Option<usize> {
        // Index in the order of RAM: regions are laid out back to back in the file.
        file.offset_of(gpa).map(|off| (off / PAGE) as usize)
    };
    let mut got = Received::default();
    let mut report = Progress { memory_bytes: file.len(), ..Progress::default() };
    loop {
        match chan.recv(&mut buf)? {
            Kind::Pages => {
                let (addrs, pages) = wire::parse_pages(&buf)?;
                for (gpa, page) in addrs.iter().zip(pages.chunks_exact(PAGE as usize)) {
                    let i = index_of(*gpa)
                        .filter(|i| *i < pages_total)
                        .ok_or(MigrationError::Address { addr: *gpa })?;
                    file.write_page(*gpa, page).map_err(wire::WireError::Io)?;
                    written[i / 64] |= 1 << (i % 64);
                    got.pages += 1;
                }
            }
            Kind::Zero => {
                for (start, n) in wire::parse_zero_ranges(&buf)? {
                    for k in 0..u64::from(n) {
                        let gpa =
                            start.checked_add(k * PAGE).ok_or(MigrationError::Address { addr: start })?;
                        let i = index_of(gpa)
                            .filter(|i| *i < pages_total)
                            .ok_or(MigrationError::Address { addr: gpa })?;
                        if written[i / 64] & (1 << (i % 64)) != 0 {
                            file.write_page(gpa, &[0u8; PAGE as usize]).map_err(wire::WireError::Io)?;
                        }
                        got.zero_pages += 1;
                    }
                }
            }
            Kind::PassDone => {
                if buf.len() >= 4 {
                    report.pass = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                }
                got.passes = report.pass + 1;
                report.bytes_sent = got.pages * PAGE;
                progress(&report);
            }
            Kind::State => {
                let state: VmState = postcard::from_bytes(&buf).map_err(MigrationError::StateDecode)?;
                lock(vm).restore_state(state)?;
                chan.send(Kind::Restored, &[])?;
                chan.flush()?;
                info!(
                    passes = got.passes,
                    pages = got.pages,
                    zero = got.zero_pages,
                    "migration received; waiting for the hand-over"
                );
                return Ok(got);
            }
            Kind::Abort => {
                return Err(MigrationError::PeerAborted(String::from_utf8_lossy(&buf).into_owned()));
            }
            other => return Err(MigrationError::Unexpected(other)),
        }
    }
}
