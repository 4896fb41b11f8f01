//! A session's mutually accepted contacts, the presence fan-out index.
//!
//! A sorted boxed slice: lookups by binary search, no hashing slack and no spare
//! capacity. Contacts change a few times a day and a supernode holds a million of these,
//! so an insert or remove reallocates rather than keeping room to grow.

use peerline_wire::Username;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ContactSet(Box<[Username]>);

impl ContactSet {
    pub(crate) fn contains(&self, user: &Username) -> bool {
        self.0.binary_search(user).is_ok()
    }

    /// Adds `user`; false if it was there already.
    pub(crate) fn insert(&mut self, user: Username) -> bool {
        match self.0.binary_search(&user) {
            Ok(_) => false,
            Err(at) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.insert(at, user);
                self.0 = v.into_boxed_slice();
                true
            }
        }
    }

    /// Removes `user`; false if it was not there.
    pub(crate) fn remove(&mut self, user: &Username) -> bool {
        match self.0.binary_search(user) {
            Ok(at) => {
                let mut v = std::mem::take(&mut self.0).into_vec();
                v.remove(at);
                self.0 = v.into_boxed_slice();
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, Username> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a ContactSet {
    type Item = &'a Username;
    type IntoIter = std::slice::Iter<'a, Username>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl FromIterator<Username> for ContactSet {
    fn from_iter<I: IntoIterator<Item = Username>>(iter: I) -> Self {
        let mut v: Vec<Username> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        ContactSet(v.into_boxed_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn name(i: u8) -> Username {
        Username::parse(&format!("user{i}")).unwrap()
    }

    proptest! {
        /// Behaves as a set: against a BTreeSet model under any sequence of changes.
        #[test]
        fn matches_a_set(ops in proptest::collection::vec((any::<bool>(), 0u8..20), 0..200)) {
            let mut c = ContactSet::default();
            let mut model = BTreeSet::new();
            for (add, i) in ops {
                let u = name(i);
                if add {
                    prop_assert_eq!(c.insert(u.clone()), model.insert(u));
                } else {
                    prop_assert_eq!(c.remove(&u), model.remove(&u));
                }
                prop_assert!(c.iter().eq(model.iter()));
                for j in 0..20 {
                    prop_assert_eq!(c.contains(&name(j)), model.contains(&name(j)));
                }
            }
        }
    }

    #[test]
    fn built_from_duplicates_holds_each_once() {
        let c: ContactSet = [name(2), name(1), name(2)].into_iter().collect();
        assert_eq!(
            c.iter().cloned().collect::<Vec<_>>(),
            vec![name(1), name(2)]
        );
    }
}
