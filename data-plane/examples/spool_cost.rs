//! What the usage spool costs a request on its serving thread: a start and a finish through
//! one lane, written in batches of 1, 4 and 16 requests (the requests a thread serves in one
//! pass of its scheduler share a write), against the same records entering the usage queue
//! without a spool. Prints microseconds per request.
//!
//! `cargo run --release -p sluice-proxy --example spool_cost [requests]`

use std::time::Instant;

use sluice_proto::v1::UsageRecord;
use sluice_proxy::control::NodeIdentity;
use sluice_proxy::spool::{Spool, SpoolOptions};
use sluice_proxy::usage::UsageSink;

/// A record as large as a real one: UUIDs for the ids, a model name, the flags set.
fn record(i: u64) -> UsageRecord {
    UsageRecord {
        request_id: format!("0192f1c0-7c3e-7d2a-9b1e-{i:012x}"),
        backend_id: "5d1f0c9e-4a7b-4c8e-9f3d-2b6a1e7c8d90".into(),
        model: "gpt-4o-mini".into(),
        client_key_id: "8e2a4c6b-1d3f-4e5a-8b7c-9d0e1f2a3b4c".into(),
        attempts: 1,
        endpoint: 1,
        ..Default::default()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args().nth(1).map_or(Ok(200_000), |a| a.parse())?;
    let dir = std::env::temp_dir().join(format!("sluice-spool-cost-{}", std::process::id()));

    let sink = UsageSink::new(usize::MAX);
    let started = Instant::now();
    for i in 0..n {
        sink.record(record(i));
    }
    let without = per_request(started, n);
    println!("{n} requests, no spool: {without:.2} µs per request");

    for batch in [1, 4, 16] {
        let spool = Spool::open(
            SpoolOptions::new(dir.join(batch.to_string())),
            &NodeIdentity::new(Some("bench".into())),
            1,
        )?;
        let lane = spool.lane(0).ok_or("no lane")?;
        let sink = UsageSink::new(usize::MAX);
        let started = Instant::now();
        let mut i = 0;
        while i < n {
            let requests: Vec<_> = (i..(i + batch).min(n))
                .map(|i| {
                    let mut rec = record(i);
                    let mut spooled = None;
                    let written = lane.start(&mut spooled, &mut rec);
                    (rec, spooled, written)
                })
                .collect();
            // The last one to wait writes the batch; the others find theirs written.
            let mut finishing = Vec::with_capacity(requests.len());
            for (mut rec, spooled, written) in requests {
                if let Ok(written) = written {
                    let _ = written.now();
                }
                rec.prompt_tokens = 9;
                rec.completion_tokens = 12;
                sink.record_with(rec, |r| finishing.push(lane.finish(spooled, r)));
            }
            for written in finishing {
                let _ = written.now();
            }
            i += batch;
        }
        let with = per_request(started, n);
        println!(
            "{n} requests, spool, {batch} per write: {with:.2} µs per request (+{:.2})",
            with - without
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn per_request(started: Instant, n: u64) -> f64 {
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}
