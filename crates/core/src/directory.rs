//! The online directory: which session (on which supernode) a user is reachable at.
//!
//! A single supernode keeps it in memory ([`MemoryDirectory`]); a fleet puts it in a
//! shared store with per-entry TTLs refreshed by the owning supernode.

use std::collections::HashMap;

use peerline_wire::Username;

/// Where a user is online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Location {
    /// Supernode id within the fleet (0 for a single supernode).
    pub node: u32,
    /// Session index on that supernode.
    pub session: u32,
}

/// The user -> location map.
pub trait Directory: Send {
    /// Records `user` at `loc`; returns the location it replaces.
    fn insert(&mut self, user: &Username, loc: Location) -> Option<Location>;
    /// Where `user` is, if online.
    fn get(&self, user: &Username) -> Option<Location>;
    /// Removes `user` only if still at `loc` (a newer login elsewhere is kept).
    fn remove_if(&mut self, user: &Username, loc: Location) -> bool;
    /// Number of users online.
    fn len(&self) -> usize;
    /// Whether nobody is online.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In-process directory for a single supernode.
#[derive(Debug, Default)]
pub struct MemoryDirectory {
    map: HashMap<Username, Location>,
}

impl MemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Directory for MemoryDirectory {
    fn insert(&mut self, user: &Username, loc: Location) -> Option<Location> {
        self.map.insert(user.clone(), loc)
    }
    fn get(&self, user: &Username) -> Option<Location> {
        self.map.get(user).copied()
    }
    fn remove_if(&mut self, user: &Username, loc: Location) -> bool {
        if self.map.get(user) == Some(&loc) {
            self.map.remove(user);
            true
        } else {
            false
        }
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_if_keeps_newer_login() {
        let mut d = MemoryDirectory::new();
        let u = Username::parse("alice").unwrap();
        let old = Location {
            node: 0,
            session: 1,
        };
        let new = Location {
            node: 0,
            session: 2,
        };
        assert_eq!(d.insert(&u, old), None);
        assert_eq!(d.insert(&u, new), Some(old));
        assert!(!d.remove_if(&u, old));
        assert_eq!(d.get(&u), Some(new));
        assert!(d.remove_if(&u, new));
        assert!(d.is_empty());
    }
}
