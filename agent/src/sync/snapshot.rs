//! A snapshot of the synced key range: every key with its value and mod revision, and the
//! store revision it stands at.

use std::{collections::BTreeMap, sync::Arc};

/// One key's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value bytes.
    pub value: Arc<[u8]>,
    /// The revision of the last write to this key.
    pub mod_revision: i64,
}

/// One change to the key range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A key was written.
    Put {
        /// The full key.
        key: String,
        /// Its new value.
        value: Arc<[u8]>,
        /// The revision of the write.
        mod_revision: i64,
    },
    /// A key was deleted.
    Delete {
        /// The full key.
        key: String,
        /// The revision of the deletion.
        mod_revision: i64,
    },
}

impl Change {
    /// The key the change is about.
    pub fn key(&self) -> &str {
        match self {
            Change::Put { key, .. } | Change::Delete { key, .. } => key,
        }
    }
}

/// Every key of the synced range at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store revision this snapshot stands at: every change up to it is included.
    pub revision: i64,
    /// Keys (full, including the prefix) and their values.
    pub entries: BTreeMap<String, Entry>,
}

impl Snapshot {
    /// Applies changes in order. A change older than the entry it would replace is ignored
    /// (a replayed event never rolls a key back). Returns how many changes took effect.
    pub fn apply(&mut self, changes: &[Change], revision: i64) -> usize {
        let mut applied = 0;
        for change in changes {
            match change {
                Change::Put {
                    key,
                    value,
                    mod_revision,
                } => {
                    if self
                        .entries
                        .get(key)
                        .is_some_and(|e| e.mod_revision >= *mod_revision)
                    {
                        continue;
                    }
                    self.entries.insert(
                        key.clone(),
                        Entry {
                            value: value.clone(),
                            mod_revision: *mod_revision,
                        },
                    );
                    applied += 1;
                }
                Change::Delete { key, mod_revision } => {
                    if self
                        .entries
                        .get(key)
                        .is_some_and(|e| e.mod_revision < *mod_revision)
                    {
                        self.entries.remove(key);
                        applied += 1;
                    }
                }
            }
        }
        self.revision = self.revision.max(revision);
        applied
    }

    /// The changes that turn `self` into `newer`: puts for new and changed keys, deletes for
    /// keys `newer` no longer has (stamped with `newer`'s revision).
    pub fn diff(&self, newer: &Snapshot) -> Vec<Change> {
        let mut changes = Vec::new();
        for (key, entry) in &newer.entries {
            if self.entries.get(key) != Some(entry) {
                changes.push(Change::Put {
                    key: key.clone(),
                    value: entry.value.clone(),
                    mod_revision: entry.mod_revision,
                });
            }
        }
        for key in self.entries.keys() {
            if !newer.entries.contains_key(key) {
                changes.push(Change::Delete {
                    key: key.clone(),
                    mod_revision: newer.revision,
                });
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, rev: i64) -> Change {
        Change::Put {
            key: key.to_owned(),
            value: value.as_bytes().into(),
            mod_revision: rev,
        }
    }

    #[test]
    fn apply_in_order_and_ignore_replays() {
        let mut s = Snapshot::default();
        assert_eq!(s.apply(&[put("a", "1", 2), put("b", "1", 3)], 3), 2);
        assert_eq!(s.apply(&[put("a", "old", 1)], 3), 0, "replayed older put");
        assert_eq!(
            s.apply(
                &[Change::Delete {
                    key: "b".into(),
                    mod_revision: 4
                }],
                4
            ),
            1
        );
        assert_eq!(s.revision, 4);
        assert_eq!(&*s.entries["a"].value, b"1");
        assert!(!s.entries.contains_key("b"));
    }

    #[test]
    fn diff_then_apply_converges() {
        let mut old = Snapshot::default();
        old.apply(
            &[
                put("keep", "1", 2),
                put("change", "1", 3),
                put("gone", "1", 4),
            ],
            4,
        );
        let mut new = Snapshot::default();
        new.apply(
            &[
                put("keep", "1", 2),
                put("change", "2", 7),
                put("new", "1", 8),
            ],
            9,
        );
        let changes = old.diff(&new);
        assert_eq!(changes.len(), 3, "{changes:?}");
        old.apply(&changes, new.revision);
        assert_eq!(old, new);
    }
}
