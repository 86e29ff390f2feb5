//! The UAIDs one connection speaks for, each with its delivery state.
//!
//! Most connections (a browser profile, a device) speak for one UAID; a relay speaks for
//! thousands. So the first UAID is kept inline, with no heap allocation, and a `HashMap` takes
//! over from the second: a `HashMap` with one entry allocates about 190 bytes, some 4% of an idle
//! connection's memory (measured with DHAT; see bench/RESULTS.md).

use std::collections::HashMap;

use crate::ids::{Appid, Uaid};

/// Delivery state of one held UAID.
#[derive(Debug, Default)]
pub struct Slot {
    /// The events of the UPDATE awaiting its ACK.
    pub in_flight: Option<Vec<(Appid, u64)>>,
}

/// UAID → [`Slot`], small for the common case.
#[derive(Debug, Default)]
pub enum Held {
    #[default]
    Empty,
    One(Uaid, Slot),
    Many(HashMap<Uaid, Slot>),
}

impl Held {
    pub fn len(&self) -> usize {
        match self {
            Held::Empty => 0,
            Held::One(..) => 1,
            Held::Many(map) => map.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, uaid: &Uaid) -> bool {
        self.get(uaid).is_some()
    }

    pub fn get(&self, uaid: &Uaid) -> Option<&Slot> {
        match self {
            Held::One(u, slot) if u == uaid => Some(slot),
            Held::Many(map) => map.get(uaid),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, uaid: &Uaid) -> Option<&mut Slot> {
        match self {
            Held::One(u, slot) if u == uaid => Some(slot),
            Held::Many(map) => map.get_mut(uaid),
            _ => None,
        }
    }

    /// Holds `uaid` with nothing in flight, unless it is held already.
    pub fn insert(&mut self, uaid: Uaid) {
        if self.contains(&uaid) {
            return;
        }
        *self = match std::mem::take(self) {
            Held::Empty => Held::One(uaid, Slot::default()),
            Held::One(first, slot) => {
                let mut map = HashMap::with_capacity(2);
                map.insert(first, slot);
                map.insert(uaid, Slot::default());
                Held::Many(map)
            }
            Held::Many(mut map) => {
                map.insert(uaid, Slot::default());
                Held::Many(map)
            }
        };
    }

    pub fn remove(&mut self, uaid: &Uaid) -> Option<Slot> {
        match self {
            Held::One(u, _) if u == uaid => match std::mem::take(self) {
                Held::One(_, slot) => Some(slot),
                _ => None,
            },
            Held::Many(map) => map.remove(uaid),
            _ => None,
        }
    }

    pub fn uaids(&self) -> impl Iterator<Item = &Uaid> {
        let (one, many) = match self {
            Held::Empty => (None, None),
            Held::One(u, _) => (Some(u), None),
            Held::Many(map) => (None, Some(map.keys())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_one_inline_to_a_map_and_back() {
        let (a, b, c) = (Uaid::random(), Uaid::random(), Uaid::random());
        let mut held = Held::default();
        assert!(held.is_empty() && !held.contains(&a));
        held.insert(a);
        held.insert(a);
        assert!(matches!(held, Held::One(..)) && held.len() == 1);
        held.get_mut(&a).unwrap().in_flight = Some(Vec::new());
        held.insert(b);
        held.insert(c);
        assert_eq!(held.len(), 3);
        assert!(
            held.get(&a).unwrap().in_flight.is_some(),
            "the first slot survives the switch"
        );
        let mut all: Vec<_> = held.uaids().copied().collect();
        all.sort_by_key(|u| u.to_string());
        let mut want = vec![a, b, c];
        want.sort_by_key(|u| u.to_string());
        assert_eq!(all, want);
        assert!(held.remove(&b).is_some() && held.remove(&b).is_none());
        assert_eq!(held.len(), 2);

        let mut one = Held::default();
        one.insert(c);
        assert!(one.remove(&a).is_none());
        assert!(one.remove(&c).is_some());
        assert!(one.is_empty() && one.uaids().next().is_none());
    }
}
