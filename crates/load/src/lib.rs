//! Peerline's load generator and reference servers.
//!
//! * [`users`]: bulk provisioning of simulated users (keys, certificates issued with the
//!   operator's authority key, store rows), an explicit test mode.
//! * [`engine`]: up to millions of simulated clients in one process, sharing sockets.
//! * [`scenario`]: `ramp`, `steady` and `storm`, with their reports.
//! * [`refserv`]: a bare batched UDP echo server, a minimal batched STUN responder, and
//!   the closed-loop client that measures any STUN server (`peerline-load stun`).
//! * [`cryptobench`]: the login's own crypto cost, the bound on logins per core-second.
//! * [`procstat`]: the supernode's CPU and memory from `/proc`; [`plot`]: the SVG plot.
#![deny(missing_docs)]

pub mod cryptobench;
pub mod engine;
pub mod plot;
pub mod procstat;
pub mod refserv;
pub mod scenario;
pub mod users;
