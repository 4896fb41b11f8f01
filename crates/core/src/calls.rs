//! The supernode's registry of calls it rang: which signals may pass between two users,
//! and which pairs of strangers may open a direct session because the callee answered.
//!
//! Every operation is O(1) except pruning, which runs at most once per second, so a
//! client cannot make the supernode scan the registry per request.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use peerline_wire::Username;

/// A call: the caller and its id for the call.
pub type CallKey = (Username, u64);

#[derive(Debug)]
struct Record {
    callee: Username,
    accepted: bool,
    expires: Instant,
}

/// How long an unanswered call stays known (callers give up after 30 s).
pub const RINGING_TTL: Duration = Duration::from_secs(60);
/// How long an answered call stays known.
pub const CALL_TTL: Duration = Duration::from_secs(12 * 3600);

/// Calls known to one supernode.
#[derive(Debug)]
pub struct Calls {
    records: HashMap<CallKey, Record>,
    per_user: HashMap<Username, usize>,
    /// Answered calls by unordered pair of users, with how many.
    accepted: HashMap<(Username, Username), usize>,
    max_total: usize,
    max_per_user: usize,
    pruned_at: Option<Instant>,
}

/// Why a call cannot be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallRefusal {
    /// The caller already uses this id.
    DuplicateId,
    /// One of the two has too many calls, or the registry is full.
    TooMany,
}

fn pair(a: &Username, b: &Username) -> (Username, Username) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl Calls {
    /// An empty registry holding at most `max_total` calls and `max_per_user` per user.
    pub fn new(max_total: usize, max_per_user: usize) -> Self {
        Calls {
            records: HashMap::new(),
            per_user: HashMap::new(),
            accepted: HashMap::new(),
            max_total,
            max_per_user,
            pruned_at: None,
        }
    }

    /// Calls known.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no call is known.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Checks whether `caller` may ring `callee` with `call_id` now.
    pub fn check(
        &mut self,
        now: Instant,
        caller: &Username,
        callee: &Username,
        call_id: u64,
    ) -> Result<(), CallRefusal> {
        self.prune(now);
        if self.records.contains_key(&(caller.clone(), call_id)) {
            return Err(CallRefusal::DuplicateId);
        }
        let count = |u: &Username| self.per_user.get(u).copied().unwrap_or(0);
        if self.records.len() >= self.max_total
            || count(caller) >= self.max_per_user
            || count(callee) >= self.max_per_user
        {
            return Err(CallRefusal::TooMany);
        }
        Ok(())
    }

    /// Registers a ringing call (after [`Calls::check`]).
    pub fn ring(
        &mut self,
        now: Instant,
        key: CallKey,
        callee: Username,
    ) -> Result<(), CallRefusal> {
        self.check(now, &key.0, &callee, key.1)?;
        *self.per_user.entry(key.0.clone()).or_default() += 1;
        *self.per_user.entry(callee.clone()).or_default() += 1;
        self.records.insert(
            key,
            Record {
                callee,
                accepted: false,
                expires: now + RINGING_TTL,
            },
        );
        Ok(())
    }

    /// The call between `a` and `b` with `call_id`, whichever of them rang: its key and
    /// whether `a` is the caller.
    pub fn find(&self, a: &Username, b: &Username, call_id: u64) -> Option<(CallKey, bool)> {
        let mine = (a.clone(), call_id);
        if self.records.get(&mine).is_some_and(|r| &r.callee == b) {
            return Some((mine, true));
        }
        let theirs = (b.clone(), call_id);
        if self.records.get(&theirs).is_some_and(|r| &r.callee == a) {
            return Some((theirs, false));
        }
        None
    }

    /// The callee answered.
    pub fn accept(&mut self, now: Instant, key: &CallKey) {
        if let Some(r) = self.records.get_mut(key) {
            if !r.accepted {
                r.accepted = true;
                *self.accepted.entry(pair(&key.0, &r.callee)).or_default() += 1;
            }
            r.expires = now + CALL_TTL;
        }
    }

    /// Forgets a call (declined, cancelled, hung up, unanswered).
    pub fn end(&mut self, key: &CallKey) {
        let Some(r) = self.records.remove(key) else {
            return;
        };
        for u in [&key.0, &r.callee] {
            if let Some(n) = self.per_user.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    self.per_user.remove(u);
                }
            }
        }
        if r.accepted {
            let p = pair(&key.0, &r.callee);
            if let Some(n) = self.accepted.get_mut(&p) {
                *n -= 1;
                if *n == 0 {
                    self.accepted.remove(&p);
                }
            }
        }
    }

    /// Whether `a` and `b` are in an answered call.
    pub fn in_accepted_call(&self, a: &Username, b: &Username) -> bool {
        self.accepted.contains_key(&pair(a, b))
    }

    /// Forgets expired calls; runs at most once per second.
    pub fn prune(&mut self, now: Instant) {
        if self
            .pruned_at
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.pruned_at = Some(now);
        let expired: HashSet<CallKey> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.end(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn a_call_is_found_from_both_sides_and_only_between_its_two_users() {
        let now = Instant::now();
        let mut c = Calls::new(10, 2);
        c.ring(now, (u("alice"), 7), u("bob")).unwrap();
        assert_eq!(
            c.find(&u("alice"), &u("bob"), 7),
            Some(((u("alice"), 7), true))
        );
        assert_eq!(
            c.find(&u("bob"), &u("alice"), 7),
            Some(((u("alice"), 7), false))
        );
        assert_eq!(c.find(&u("carol"), &u("alice"), 7), None);
        assert_eq!(c.find(&u("alice"), &u("bob"), 8), None);
        assert_eq!(
            c.ring(now, (u("alice"), 7), u("bob")),
            Err(CallRefusal::DuplicateId)
        );
    }

    #[test]
    fn only_an_answered_call_lets_the_pair_connect_and_ending_it_revokes_that() {
        let now = Instant::now();
        let mut c = Calls::new(10, 2);
        let key = (u("alice"), 1);
        c.ring(now, key.clone(), u("bob")).unwrap();
        assert!(!c.in_accepted_call(&u("alice"), &u("bob")));
        c.accept(now, &key);
        assert!(c.in_accepted_call(&u("bob"), &u("alice")));
        c.end(&key);
        assert!(!c.in_accepted_call(&u("alice"), &u("bob")));
        assert!(c.is_empty());
        assert!(
            c.per_user.is_empty() && c.accepted.is_empty(),
            "no leftovers"
        );
    }

    #[test]
    fn limits_per_user_and_in_total_hold_and_expired_calls_free_their_slots() {
        let now = Instant::now();
        let mut c = Calls::new(3, 2);
        c.ring(now, (u("alice"), 1), u("bob")).unwrap();
        c.ring(now, (u("alice"), 2), u("carol")).unwrap();
        assert_eq!(
            c.ring(now, (u("alice"), 3), u("dave")),
            Err(CallRefusal::TooMany),
            "alice has two calls"
        );
        assert_eq!(
            c.ring(now, (u("erin"), 1), u("bob")).map(|_| ()),
            Ok(()),
            "bob has one"
        );
        assert_eq!(
            c.ring(now, (u("frank"), 1), u("gina")),
            Err(CallRefusal::TooMany),
            "registry full"
        );
        let later = now + RINGING_TTL + Duration::from_secs(1);
        c.prune(later);
        assert!(c.is_empty());
        c.ring(later, (u("alice"), 3), u("dave")).unwrap();
    }
}
