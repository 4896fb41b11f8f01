//! Peerline's NAT lab: real hosts behind real NATs on one Linux machine, built from network
//! namespaces, veth pairs and nftables (see `README.md` beside this crate and the facts in
//! `shared/LAB.md`). It knows nothing about Peerline's protocol: callers get namespaces with
//! addresses, spawn processes in them with [`Host::command`], or open sockets in them with
//! [`Host::udp_bind`] and friends.
//!
//! Everything the lab creates lives in namespaces named `{prefix}{pid}-{seq}-{name}`, so
//! parallel runs (and parallel labs in one test process) never clash, and dropping the [`Lab`]
//! removes all of it. [`cleanup_stale`] removes what a crashed run left behind.
#![forbid(unsafe_code)]

pub mod impair;
mod lab;
pub mod matrix;
mod nfqueue;
pub mod probe;
pub mod quality;
mod rules;
pub mod wav;

pub use impair::{ImpairConfig, LossModel, StageStats};
pub use lab::{check_environment, cleanup_stale, Environment, Host, Lab, Nat, NatOptions};

use std::fmt;
use std::str::FromStr;

/// The NAT behaviours the lab can build (RFC 4787 terms in [`NatType::expected`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(into = "&'static str")]
pub enum NatType {
    /// No translation: a plain router, the host has a public (198.51.100.x) address.
    Public,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering (Linux's default).
    PortRestricted,
    /// Endpoint-dependent mapping: a new public port per destination.
    Symmetric,
    /// All UDP to the outside dropped; TCP to ports 80 and 443 allowed.
    UdpBlocked,
}

impl NatType {
    pub const ALL: [NatType; 6] = [
        NatType::Public,
        NatType::FullCone,
        NatType::Restricted,
        NatType::PortRestricted,
        NatType::Symmetric,
        NatType::UdpBlocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NatType::Public => "public",
            NatType::FullCone => "full-cone",
            NatType::Restricted => "restricted",
            NatType::PortRestricted => "port-restricted",
            NatType::Symmetric => "symmetric",
            NatType::UdpBlocked => "udp-blocked",
        }
    }

    /// The mapping and filtering the probe should observe (the table in `shared/LAB.md`).
    pub fn expected(self) -> (probe::Mapping, probe::Filtering) {
        use probe::{Filtering as F, Mapping as M};
        match self {
            NatType::Public => (M::None, F::EndpointIndependent),
            NatType::FullCone => (M::EndpointIndependent, F::EndpointIndependent),
            NatType::Restricted => (M::EndpointIndependent, F::AddressDependent),
            NatType::PortRestricted => (M::EndpointIndependent, F::AddressAndPortDependent),
            NatType::Symmetric => (M::EndpointDependent, F::AddressAndPortDependent),
            NatType::UdpBlocked => (M::Blocked, F::Blocked),
        }
    }
}

impl From<NatType> for &'static str {
    fn from(t: NatType) -> Self {
        t.as_str()
    }
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NatType {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        NatType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| LabError::UnknownNatType(s.to_owned()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the NAT lab needs root: run it with sudo")]
    NotRoot,
    #[error("{tool} is missing: apt-get install {package}")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{0}")]
    Invalid(String),
    #[error("unknown NAT type {0:?} (one of: public, full-cone, restricted, port-restricted, symmetric, udp-blocked)")]
    UnknownNatType(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn nat_type_names_round_trip() {
        for t in NatType::ALL {
            assert_eq!(t.as_str().parse::<NatType>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
        }
        assert!("cone".parse::<NatType>().is_err());
    }
}
