//! The user's side of Peerline: profile, message history, the background agent with its
//! local control socket, the command-line front end, the terminal app, and the demo.
//!
//! The agent owns the device's sessions (via `peerline-net`'s client driver); the CLI is a
//! thin client of the agent's control socket.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod agent;
#[cfg(feature = "audio")]
pub mod audio;
pub mod calls;
pub mod cli;
pub mod control;
pub mod demo;
pub mod history;
pub mod profile;
pub mod tui;
