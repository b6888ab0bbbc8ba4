//! Document ids kept once per worker of the subscription stage, each with a 32-bit slot
//! that per-subscription maps use as their key instead of the id itself.

use rustc_hash::FxHashMap as HashMap;

use crate::doc_id::DocId;

/// Document ids kept once per worker, with a 32-bit slot that unsorted subscriptions and live
/// pipelines use in their per-document maps (an id takes 16 bytes or more; a slot 4).
#[derive(Default)]
pub struct Slots {
    by_id: HashMap<DocId, (u32, u32)>,
    ids: Vec<Option<DocId>>,
    free: Vec<u32>,
}

impl Slots {
    /// The slot of `id`, if anything holds it.
    pub fn find(&self, id: &DocId) -> Option<u32> {
        self.by_id.get(id).map(|(slot, _)| *slot)
    }

    /// The slot of `id`, counting one more holder.
    pub fn acquire(&mut self, id: &DocId) -> u32 {
        if let Some((slot, holders)) = self.by_id.get_mut(id) {
            *holders += 1;
            return *slot;
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.ids[slot as usize] = Some(id.clone());
                slot
            }
            None => {
                self.ids.push(Some(id.clone()));
                u32::try_from(self.ids.len() - 1).expect("fewer than 2^32 documents per worker")
            }
        };
        self.by_id.insert(id.clone(), (slot, 1));
        slot
    }

    /// One holder fewer for `slot`; the slot is freed with the last.
    pub fn release(&mut self, slot: u32) {
        let Some(id) = self.ids.get(slot as usize).cloned().flatten() else { return };
        let Some((_, holders)) = self.by_id.get_mut(&id) else { return };
        *holders -= 1;
        if *holders == 0 {
            self.by_id.remove(&id);
            self.ids[slot as usize] = None;
            self.free.push(slot);
            if self.by_id.is_empty() {
                // Nothing held any more: give the tables back.
                *self = Slots::default();
            } else {
                crate::shrink::shrink_if_sparse(&mut self.by_id);
            }
        }
    }
}
