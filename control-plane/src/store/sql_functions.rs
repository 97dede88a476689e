//! The SQL functions every connection of the store gets, so that queries and migrations
//! add latency histograms (see [`crate::usage::histogram`] for the stored form) in SQL.

use crate::usage::histogram::{Histogram, HistogramError, merge_encoded};

/// Registers the SQL functions that build and merge stored histograms:
/// - aggregate `usage_histogram(h)`: the sum of the stored histograms `h` (NULL is
///   skipped);
/// - scalar `usage_histogram_add(a, b)`: the sum of two stored histograms;
/// - scalar `sluice_saturating_add(a, b)`: the sum of two integers, at most `i64::MAX` and at
///   least `i64::MIN` (SQLite's `+` turns a sum past them into a REAL, which a STRICT INTEGER
///   column refuses).
pub fn register(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    let flags = FunctionFlags::SQLITE_UTF8
        | FunctionFlags::SQLITE_DETERMINISTIC
        | FunctionFlags::SQLITE_INNOCUOUS;
    conn.create_aggregate_function("usage_histogram", 1, flags, HistogramAggregate)?;
    conn.create_scalar_function("usage_histogram_add", 2, flags, |ctx| {
        let blob = |i| match ctx.get_raw(i) {
            rusqlite::types::ValueRef::Blob(b) => Ok(b),
            rusqlite::types::ValueRef::Null => Ok(&[][..]),
            _ => Err(rusqlite::Error::UserFunctionError(Box::new(
                HistogramError("not a histogram"),
            ))),
        };
        merge_encoded(blob(0)?, blob(1)?)
            .map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))
    })?;
    conn.create_scalar_function("sluice_saturating_add", 2, flags, |ctx| {
        Ok(ctx.get::<i64>(0)?.saturating_add(ctx.get::<i64>(1)?))
    })
}

fn add_sql_value(h: &mut Histogram, value: rusqlite::types::ValueRef<'_>) -> rusqlite::Result<()> {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Blob(bytes) => h
            .merge_encoded(bytes)
            .map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))?,
        ValueRef::Null => {}
        ValueRef::Integer(_) | ValueRef::Real(_) | ValueRef::Text(_) => {
            return Err(rusqlite::Error::UserFunctionError(Box::new(
                HistogramError("not a histogram"),
            )));
        }
    }
    Ok(())
}

struct HistogramAggregate;

impl rusqlite::functions::Aggregate<Histogram, Vec<u8>> for HistogramAggregate {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<Histogram> {
        Ok(Histogram::default())
    }

    fn step(
        &self,
        ctx: &mut rusqlite::functions::Context<'_>,
        h: &mut Histogram,
    ) -> rusqlite::Result<()> {
        add_sql_value(h, ctx.get_raw(0))
    }

    fn finalize(
        &self,
        _: &mut rusqlite::functions::Context<'_>,
        h: Option<Histogram>,
    ) -> rusqlite::Result<Vec<u8>> {
        Ok(h.unwrap_or_default().encode())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::usage::histogram::encode_buckets;

    #[test]
    fn sql_functions_build_and_merge_histograms() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        register(&conn).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (g INTEGER, h BLOB);
             INSERT INTO t VALUES (1, unhex('03' || '0000000000000002')), (1, NULL), (1, x''),
                                  (1, unhex('03' || '0000000000000001' || '09' || '0000000000000004')),
                                  (2, unhex('00' || '0000000000000001'));",
        )
        .unwrap();
        let sum: Vec<u8> = conn
            .query_row("SELECT usage_histogram(h) FROM t WHERE g = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(sum, encode_buckets([(3, 3), (9, 4)]));
        let added: Vec<u8> = conn
            .query_row(
                "SELECT usage_histogram_add((SELECT h FROM t WHERE g = 2), ?1)",
                [&sum],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(added, encode_buckets([(0, 1), (3, 3), (9, 4)]));
        // Corrupt input is an SQL error, not a panic.
        assert!(
            conn.query_row("SELECT usage_histogram(x'0102')", [], |r| r
                .get::<_, Vec<u8>>(0))
                .is_err()
        );
        assert!(
            conn.query_row("SELECT usage_histogram_add('text', x'')", [], |r| r
                .get::<_, Vec<u8>>(0))
                .is_err()
        );
    }
}
