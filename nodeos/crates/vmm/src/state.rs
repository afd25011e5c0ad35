//! Saved device state: what a snapshot or a live migration carries for each
//! device, and the one error a restore reports.
//!
//! Every device that holds guest-visible state has a `save(&self) -> XState`
//! and a `restore(&mut self, XState) -> Result<(), StateError>` (or the same
//! on a shared handle). `XState` is a plain serde struct: no file descriptors,
//! no host addresses. A restore treats its input as hostile (it comes off the
//! network during a migration): every index, length and enum value is
//! checked, and a bad one is a [`StateError`] that leaves the device as it
//! was, never a panic. A restore into a device built from the same
//! configuration must make it behave exactly as the saved one did.

/// A saved state that cannot be restored into this device.
#[derive(Debug, thiserror::Error)]
#[error("{device} state: {reason}")]
pub struct StateError {
    /// The device (or part of the VM) whose state was refused.
    pub device: &'static str,
    /// What is wrong with it, for the operator.
    pub reason: String,
}

impl StateError {
    pub fn new(device: &'static str, reason: impl Into<String>) -> Self {
        Self { device, reason: reason.into() }
    }
}
