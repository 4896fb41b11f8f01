//! The in-process fleet directory: one map shared by every supernode in the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use crate::{Clock, FleetConfig, FleetDirectory, FleetError, FleetLocation, Member, Username};

/// Expired entries are swept out after this many writes, so the map stays bounded by the
/// users actually online even if nobody ever looks them up again.
const SWEEP_EVERY: u32 = 1024;

/// An in-process [`FleetDirectory`]. Clones share one map, so several in-process
/// supernodes (or a test's simulated fleet) see the same directory; time comes from the
/// injected [`Clock`].
#[derive(Debug, Clone)]
pub struct MemoryFleetDirectory {
    inner: Arc<Mutex<State>>,
    clock: Arc<dyn Clock>,
    config: FleetConfig,
}

#[derive(Debug, Default)]
struct State {
    locations: HashMap<Username, (FleetLocation, Duration)>,
    members: HashMap<u32, (Member, Duration)>,
    writes: u32,
}

impl MemoryFleetDirectory {
    /// An empty directory on `clock`, with `config`'s TTLs (the prefix is not used).
    pub fn new(clock: Arc<dyn Clock>, config: FleetConfig) -> Self {
        Self {
            inner: Arc::default(),
            clock,
            config,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated (every update
        // is a single insert or remove), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of unexpired location entries, whether or not their node is live.
    pub fn len(&self) -> usize {
        let now = self.clock.now();
        self.state()
            .locations
            .values()
            .filter(|(_, exp)| *exp > now)
            .count()
    }

    /// Whether there are no unexpired location entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl State {
    fn wrote(&mut self, now: Duration) {
        self.writes = self.writes.wrapping_add(1);
        if self.writes.is_multiple_of(SWEEP_EVERY) {
            self.locations.retain(|_, (_, exp)| *exp > now);
            self.members.retain(|_, (_, exp)| *exp > now);
        }
    }

    fn current(&self, user: &Username, now: Duration) -> Option<FleetLocation> {
        self.locations
            .get(user)
            .filter(|(_, exp)| *exp > now)
            .map(|(loc, _)| *loc)
    }

    fn resolves(&self, loc: FleetLocation, now: Duration) -> bool {
        self.members
            .get(&loc.node)
            .is_some_and(|(m, exp)| *exp > now && m.epoch == loc.epoch)
    }
}

#[async_trait]
impl FleetDirectory for MemoryFleetDirectory {
    async fn claim(
        &self,
        user: &Username,
        loc: FleetLocation,
    ) -> Result<Option<FleetLocation>, FleetError> {
        let now = self.clock.now();
        let mut s = self.state();
        let prev = s.current(user, now);
        s.locations
            .insert(user.clone(), (loc, now + self.config.location_ttl));
        s.wrote(now);
        Ok(prev)
    }

    async fn release(&self, user: &Username, loc: FleetLocation) -> Result<bool, FleetError> {
        let now = self.clock.now();
        let mut s = self.state();
        if s.current(user, now) == Some(loc) {
            s.locations.remove(user);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn lookup(&self, user: &Username) -> Result<Option<FleetLocation>, FleetError> {
        let now = self.clock.now();
        let s = self.state();
        Ok(s.current(user, now).filter(|l| s.resolves(*l, now)))
    }

    async fn lookup_many(
        &self,
        users: &[Username],
    ) -> Result<Vec<Option<FleetLocation>>, FleetError> {
        let now = self.clock.now();
        let s = self.state();
        Ok(users
            .iter()
            .map(|u| s.current(u, now).filter(|l| s.resolves(*l, now)))
            .collect())
    }

    async fn refresh(
        &self,
        entries: &[(Username, FleetLocation)],
    ) -> Result<Vec<bool>, FleetError> {
        let now = self.clock.now();
        let exp = now + self.config.location_ttl;
        let mut s = self.state();
        let mut out = Vec::with_capacity(entries.len());
        for (user, loc) in entries {
            let ours = match s.current(user, now) {
                None => true,
                Some(cur) => cur == *loc,
            };
            if ours {
                s.locations.insert(user.clone(), (*loc, exp));
            }
            out.push(ours);
        }
        s.wrote(now);
        Ok(out)
    }

    async fn announce(&self, member: &Member) -> Result<(), FleetError> {
        let now = self.clock.now();
        let mut s = self.state();
        s.members
            .insert(member.id, (member.clone(), now + self.config.member_ttl));
        s.wrote(now);
        Ok(())
    }

    async fn withdraw(&self, id: u32) -> Result<(), FleetError> {
        self.state().members.remove(&id);
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>, FleetError> {
        let now = self.clock.now();
        let mut live: Vec<Member> = self
            .state()
            .members
            .values()
            .filter(|(_, exp)| *exp > now)
            .map(|(m, _)| m.clone())
            .collect();
        live.sort_by_key(|m| m.id);
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VirtualClock;

    #[tokio::test]
    async fn expired_entries_are_swept_so_the_map_stays_bounded() {
        let clock = VirtualClock::new();
        let dir = MemoryFleetDirectory::new(Arc::new(clock.clone()), FleetConfig::default());
        let loc = FleetLocation { node: 1, epoch: 1 };
        for i in 0..SWEEP_EVERY {
            let u = Username::parse(&format!("user{i}")).expect("valid name");
            dir.claim(&u, loc).await.expect("memory never fails");
        }
        clock.advance(FleetConfig::default().location_ttl + Duration::from_secs(1));
        for i in 0..SWEEP_EVERY {
            let u = Username::parse(&format!("late{i}")).expect("valid name");
            dir.claim(&u, loc).await.expect("memory never fails");
        }
        // The sweep on the 2048th write dropped the first 1024 expired entries.
        assert_eq!(dir.state().locations.len(), SWEEP_EVERY as usize);
    }
}
