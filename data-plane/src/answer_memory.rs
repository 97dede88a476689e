//! The memory whole answers may hold: `--max-buffered-answer-bytes` over every connection of
//! the replica, and of it at most `--max-buffered-answer-bytes-per-key` for the answers of
//! any one client key (by default half, and never less than the largest answer). Without the
//! share, one key's clients asking for large answers and slow to read them (each holds its
//! answer until its deadline) could hold it all, and every other key's large answers were
//! refused after the provider had generated, and billed, them.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Marks a response whose bytes are counted already (a backend's whole answer holds its
/// permits) or need no counting (a stream, relayed only as fast as its client reads it). On
/// HTTP/2 the listener counts any other answer, under [`OWN_ANSWERS`].
#[derive(Debug, Clone, Copy)]
pub struct CountedAnswer;

/// The key the answers a replica makes itself on HTTP/2 are held under (errors, `/metrics`,
/// model lists: no backend, often no key), in a pool of their own as large as one key's share
/// of `--max-buffered-answer-bytes`. An h2 client that grants its streams no flow-control
/// window keeps such answers in memory until its connection's deadline, 200 a connection;
/// counted, they hold at most that pool, and backends' answers filling the replica's memory
/// still get their 503 made.
pub const OWN_ANSWERS: &str = "";

/// What an answer on an HTTP/2 stream holds besides its body, counted with it: the stream's
/// state in hyper and h2 and its head (an estimate).
pub const H2_STREAM_BYTES: usize = 2048;

/// What a stream holds for the event it reads without counting it here: past it, all it holds
/// for the event is counted (see `proxy::relay`), as a whole answer this small on HTTP/1 holds
/// uncounted.
pub const UNCOUNTED_STREAM_BYTES: usize = 64 * 1024;

/// Why an answer's bytes could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The replica's answers hold `--max-buffered-answer-bytes`.
    Replica,
    /// The key's answers hold its share.
    Key,
}

/// See the module's documentation. Shared by every serving thread.
#[derive(Debug)]
pub struct AnswerMemory {
    total: Arc<Semaphore>,
    /// What `total` started with.
    capacity: usize,
    per_key: usize,
    /// Bytes held by each key holding any, by the hash of its id (two keys whose ids hash
    /// alike, one chance in 2^64 a pair, would share a share): no allocation an answer.
    keys: Mutex<foldhash::HashMap<u64, usize>>,
    ids: foldhash::quality::RandomState,
}

impl AnswerMemory {
    pub fn new(total: usize, per_key: usize) -> Arc<Self> {
        let capacity = total.min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            total: Arc::new(Semaphore::new(capacity)),
            capacity,
            per_key,
            keys: Mutex::default(),
            ids: foldhash::quality::RandomState::default(),
        })
    }

    /// `bytes` more for an answer to `key`, if both the replica's memory and the key's share
    /// have them.
    pub fn take(self: &Arc<Self>, key: &str, bytes: usize) -> Result<AnswerPermit, Full> {
        let key = self.ids.hash_one(key);
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let held = keys.get(&key).copied().unwrap_or(0);
        if held.saturating_add(bytes) > self.per_key {
            return Err(Full::Key);
        }
        let total = u32::try_from(bytes)
            .ok()
            .and_then(|n| Arc::clone(&self.total).try_acquire_many_owned(n).ok())
            .ok_or(Full::Replica)?;
        *keys.entry(key).or_default() += bytes;
        Ok(AnswerPermit {
            total: Some(total),
            memory: Arc::clone(self),
            key,
            bytes,
        })
    }

    /// Bytes the answers to `key` hold now.
    pub fn held_by(&self, key: &str) -> usize {
        let key = self.ids.hash_one(key);
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(&key).copied().unwrap_or(0)
    }

    /// Bytes the replica's answers may still take.
    pub fn available(&self) -> usize {
        self.total.available_permits()
    }

    /// Bytes the replica's answers hold now.
    pub fn held(&self) -> usize {
        self.capacity.saturating_sub(self.available())
    }
}

/// Bytes an answer holds of an [`AnswerMemory`], given back when dropped.
#[derive(Debug)]
pub struct AnswerPermit {
    /// `None` once merged into another.
    total: Option<OwnedSemaphorePermit>,
    memory: Arc<AnswerMemory>,
    key: u64,
    bytes: usize,
}

impl AnswerPermit {
    /// Holds `other`'s bytes too (taken for the same answer, so for the same key).
    pub fn merge(&mut self, mut other: AnswerPermit) {
        if let Some(total) = other.total.take() {
            match &mut self.total {
                Some(mine) => mine.merge(total),
                None => self.total = Some(total),
            }
        }
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for AnswerPermit {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut keys = self
            .memory
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = keys.get_mut(&self.key) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_key_holds_at_most_its_share_and_gives_it_back() {
        let memory = AnswerMemory::new(100, 40);
        let mut a = memory.take("a", 30).unwrap();
        assert_eq!(memory.take("a", 11).unwrap_err(), Full::Key);
        a.merge(memory.take("a", 10).unwrap());
        assert_eq!(memory.held_by("a"), 40);
        let b = memory.take("b", 40).unwrap();
        let c = memory.take("c", 20).unwrap();
        assert_eq!(memory.take("d", 1).unwrap_err(), Full::Replica);
        assert_eq!(memory.available(), 0);
        drop(a);
        assert_eq!(memory.held_by("a"), 0);
        assert_eq!(memory.available(), 40);
        drop((b, c));
        assert_eq!(memory.available(), 100);
        assert!(memory.keys.lock().unwrap().is_empty());
    }
}
