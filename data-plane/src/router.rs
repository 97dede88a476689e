//! The order in which a request tries the backends that serve its model: primary pool before
//! fallback, lower priority first, and a weighted random order among equals (so traffic
//! spreads by weight and every equal backend gets its turn as first choice).

use rand::Rng;
use smallvec::SmallVec;

use crate::snapshot::{Backend, Route};

/// A model's routes in the order to try them: up to four (a model rarely has more) kept in
/// place, so that ordering them takes no allocation at each request.
pub type Order<'a> = SmallVec<[&'a Route; 4]>;

/// `routes` (already sorted by pool and priority, as the snapshot keeps them) in the order to
/// try them.
pub fn order<'a>(routes: &'a [Route], backends: &[Backend], rng: &mut impl Rng) -> Order<'a> {
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
            let weight = backends
                .get(route.backend)
                .map_or(1.0, |b| f64::from(b.weight.max(1)));
            let u: f64 = 1.0 - rng.random::<f64>();
            ordered.push((route, u.ln() / weight));
        }
        ordered[start..].sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    ordered.into_iter().map(|(route, _)| route).collect()
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
        order(snap.routes("m").unwrap(), snap.backends(), rng)
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
}
