//! Peerline's sans-IO protocol cores.
//!
//! Nothing in this crate opens a socket, reads a clock or draws from a global RNG: every
//! state machine is driven with `handle_*(now, input)` calls and drained with `poll_*`
//! calls, and takes its randomness from the caller. The tokio glue lives in `peerline-net`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod call;
pub mod calls;
pub mod client;
pub mod clock;
pub mod directory;
pub mod limit;
pub mod link;
pub mod mem;
pub mod memstore;
pub mod nat;
pub mod ops;
pub mod relay;
#[doc(hidden)]
pub mod sim;
pub mod store;
#[doc(hidden)]
pub mod store_conformance;
pub mod stun;
pub mod supernode;
