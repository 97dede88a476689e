//! The order in which a request tries the backends that serve its model: primary pool before
//! fallback, lower priority first, and a weighted random order among equals (so traffic
//! spreads by weight and every equal backend gets its turn as first choice). A request that
//! names its conversation (`prompt_cache_key`) gets the order drawn from that name instead of
//! at random: the same on every replica, so a conversation keeps to one backend.

use rand::Rng;
use sha2::{Digest, Sha256};
use smallvec::SmallVec;

use crate::snapshot::{Backend, Route};

/// A model's routes in the order to try them: up to four (a model rarely has more) kept in
/// place, so that ordering them takes no allocation at each request.
pub type Order<'a> = SmallVec<[&'a Route; 4]>;

/// `routes` (already sorted by pool and priority, as the snapshot keeps them) in the order to
/// try them. With a `conversation` (the request's `prompt_cache_key`), equals are ordered by
/// draws made from it and each backend's id ([`draw`]) rather than at random: every request
/// of the conversation, on any replica, tries the same backend first, and fails over to the
/// same next one. Providers cache prompts per account and route by that key within one
/// (OpenAI), so spreading a conversation's turns loses its cached input; and what a stateless
/// Responses client sends back (`reasoning.encrypted_content`) only the account that wrote it
/// can read. The draws keep the weights' shares over many conversations, and a backend added
/// or removed moves only the conversations it takes or held (rendezvous hashing).
pub fn order<'a>(
    routes: &'a [Route],
    backends: &[Backend],
    rng: &mut impl Rng,
    conversation: Option<&str>,
) -> Order<'a> {
    let mut ordered: SmallVec<[(&Route, f64); 4]> = SmallVec::with_capacity(routes.len());
    for group in routes.chunk_by(|a, b| rank(a, backends) == rank(b, backends)) {
        // A route alone in its rank, as most are, has nothing to be drawn against: no random
        // number and no logarithm for it.
        if let [route] = group {
            ordered.push((route, 0.0));
            continue;
        }
        let start = ordered.len();
        for route in group {
            // Efraimidis–Spirakis: sorting by u^(1/w) descending draws a weighted random
            // permutation without replacement.
            let backend = backends.get(route.backend);
            let weight = backend.map_or(1.0, |b| f64::from(b.weight.max(1)));
            let u = match (conversation, backend) {
                (Some(conversation), Some(backend)) => draw(conversation, &backend.id),
                _ => 1.0 - rng.random::<f64>(),
            };
            ordered.push((route, u.ln() / weight));
        }
        ordered[start..].sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    ordered.into_iter().map(|(route, _)| route).collect()
}

/// A number in (0, 1] drawn from a conversation's name and a backend's id: the same on every
/// replica and release (SHA-256, not std's hasher, whose output may change between Rust
/// releases and so between replicas mid-upgrade), evenly spread, and independent from one
/// backend to the next.
fn draw(conversation: &str, backend_id: &str) -> f64 {
    let digest = Sha256::new()
        .chain_update((conversation.len() as u64).to_le_bytes())
        .chain_update(conversation)
        .chain_update(backend_id)
        .finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    // The top 53 bits, as a double holds them exactly; +1 keeps 0 out (its logarithm).
    ((u64::from_le_bytes(first) >> 11) + 1) as f64 / (1u64 << 53) as f64
}

fn rank(route: &Route, backends: &[Backend]) -> Option<(crate::snapshot::Pool, i32)> {
    backends.get(route.backend).map(|b| (b.pool, b.priority))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::clock::Now;
    use crate::snapshot::Snapshot;
    use rand::SeedableRng;
    use sluice_proto::v1 as proto;

    fn backend(id: &str, pool: proto::Pool, priority: i32, weight: u32) -> proto::SnapshotBackend {
        proto::SnapshotBackend {
            id: id.into(),
            name: id.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            pool: pool as i32,
            priority,
            weight,
            models: vec![proto::ModelRoute {
                name: "m".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn snapshot(backends: Vec<proto::SnapshotBackend>) -> Snapshot {
        let message = proto::Snapshot {
            version: 1,
            backends,
            ..Default::default()
        };
        Snapshot::prepare(message, None, Now::read(), 1).unwrap()
    }

    fn ids(snap: &Snapshot, rng: &mut impl Rng) -> Vec<String> {
        ids_for(snap, rng, None)
    }

    fn ids_for(snap: &Snapshot, rng: &mut impl Rng, conversation: Option<&str>) -> Vec<String> {
        order(
            snap.routes("m").unwrap(),
            snap.backends(),
            rng,
            conversation,
        )
        .iter()
        .map(|r| snap.backends()[r.backend].id.clone())
        .collect()
    }

    #[tokio::test]
    async fn pools_then_priorities_come_first() {
        let snap = snapshot(vec![
            backend("fallback", proto::Pool::Fallback, 0, 1),
            backend("p-low", proto::Pool::Primary, 5, 1),
            backend("p-high", proto::Pool::Primary, 1, 1),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20 {
            assert_eq!(ids(&snap, &mut rng), ["p-high", "p-low", "fallback"]);
        }
    }

    #[tokio::test]
    async fn equals_are_shuffled_by_weight() {
        let snap = snapshot(vec![
            backend("a", proto::Pool::Primary, 0, 3),
            backend("b", proto::Pool::Primary, 0, 1),
            backend("z", proto::Pool::Fallback, 0, 1),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let mut first_a = 0;
        for _ in 0..4000 {
            let order = ids(&snap, &mut rng);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], "z");
            if order[0] == "a" {
                first_a += 1;
            }
        }
        // Weight 3 against 1: "a" goes first three times in four.
        assert!((2850..=3150).contains(&first_a), "{first_a}");
    }

    /// A conversation's requests keep to one order whatever the random draws, different
    /// conversations spread by weight, and pools and priorities still come first.
    #[tokio::test]
    async fn a_conversation_keeps_its_order_and_conversations_spread_by_weight() {
        let snap = snapshot(vec![
            backend("a", proto::Pool::Primary, 0, 3),
            backend("b", proto::Pool::Primary, 0, 1),
            backend("z", proto::Pool::Fallback, 0, 1),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let mut first_a = 0;
        for n in 0..4000 {
            let conversation = format!("conversation-{n}");
            let order = ids_for(&snap, &mut rng, Some(&conversation));
            for _ in 0..3 {
                assert_eq!(ids_for(&snap, &mut rng, Some(&conversation)), order);
            }
            assert_eq!(order[2], "z");
            if order[0] == "a" {
                first_a += 1;
            }
        }
        assert!((2850..=3150).contains(&first_a), "{first_a}");
    }

    /// Adding a backend moves only the conversations it takes first: the others keep theirs
    /// (the point of drawing per backend rather than hashing onto a list's index).
    #[tokio::test]
    async fn a_backend_added_takes_conversations_from_the_others_and_moves_no_other() {
        let two = snapshot(vec![
            backend("a", proto::Pool::Primary, 0, 1),
            backend("b", proto::Pool::Primary, 0, 1),
        ]);
        let three = snapshot(vec![
            backend("a", proto::Pool::Primary, 0, 1),
            backend("b", proto::Pool::Primary, 0, 1),
            backend("c", proto::Pool::Primary, 0, 1),
        ]);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut taken = 0;
        for n in 0..3000 {
            let conversation = format!("c{n}");
            let before = ids_for(&two, &mut rng, Some(&conversation))[0].clone();
            let after = ids_for(&three, &mut rng, Some(&conversation))[0].clone();
            if after == "c" {
                taken += 1;
            } else {
                assert_eq!(after, before, "{conversation}");
            }
        }
        assert!((900..=1100).contains(&taken), "{taken}");
    }
}
