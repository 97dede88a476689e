//! Routing pools: every usable primary backend is tried before any fallback one.

use sluice_proto::v1 as pb;

/// A backend's routing pool. Ordered: `Primary < Fallback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pool {
    Primary,
    Fallback,
}

/// A pool number no version of the API defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown pool {0}; use POOL_PRIMARY or POOL_FALLBACK")]
pub struct UnknownPool(pub i32);

impl TryFrom<i32> for Pool {
    type Error = UnknownPool;

    /// Unspecified means primary, the pool a new backend belongs in unless said otherwise.
    fn try_from(value: i32) -> Result<Self, UnknownPool> {
        match pb::Pool::try_from(value) {
            Ok(pb::Pool::Primary | pb::Pool::Unspecified) => Ok(Pool::Primary),
            Ok(pb::Pool::Fallback) => Ok(Pool::Fallback),
            Err(_) => Err(UnknownPool(value)),
        }
    }
}

impl From<Pool> for pb::Pool {
    fn from(pool: Pool) -> Self {
        match pool {
            Pool::Primary => pb::Pool::Primary,
            Pool::Fallback => pb::Pool::Fallback,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_is_primary_and_unknown_is_refused() {
        assert_eq!(
            Pool::try_from(pb::Pool::Unspecified as i32),
            Ok(Pool::Primary)
        );
        assert_eq!(
            Pool::try_from(pb::Pool::Fallback as i32),
            Ok(Pool::Fallback)
        );
        assert_eq!(Pool::try_from(7), Err(UnknownPool(7)));
        for pool in [Pool::Primary, Pool::Fallback] {
            assert_eq!(Pool::try_from(pb::Pool::from(pool) as i32), Ok(pool));
        }
        assert!(Pool::Primary < Pool::Fallback);
    }
}
