//! virtio-rng: random bytes from the host kernel's CSPRNG for the guest's
//! `virtio_rng` driver, so a guest never waits for entropy at boot.
//!
//! # Layout
//! - `device.rs`: [`Rng`], the virtio device (one request queue, no config
//!   space, one I/O thread) and the host entropy source.
//! - `limit.rs`: [`RateLimit`] and the sans-IO [`TokenBucket`] that bounds the
//!   bytes per second a guest can draw.
//!
//! # Protocol
//! The driver posts device-writable buffers; the device fills them (at most
//! [`MAX_REQUEST`] bytes a chain) and returns them with the count written. A
//! chain with a device-readable buffer is a bad request and comes back with 0
//! bytes. When the bucket is empty the I/O thread holds the next chain until
//! enough bytes have refilled, waking on an epoll timeout rather than the
//! guest's doorbell.

pub mod device;
pub mod limit;

pub use device::{MAX_REQUEST, QUEUE_SIZE, Rng, RngCounters};
pub use limit::{RateLimit, RateLimitError, TokenBucket};
