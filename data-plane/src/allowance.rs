//! Budget allowances, the replica's side: each client key with a budget has a pool of money
//! the control plane granted this replica, which requests spend locally. A request is
//! admitted when the pool covers its reserve (what its prompt is estimated to cost); when
//! it ends, the difference between its real cost and its reserve is settled into the pool
//! (which may go below zero: a debt the next grant pays first, so an ask asks for the debt
//! and the reserve together; a snapshot of a new budget period voids a debt of the old
//! one). When the pool falls below half of its last grant, the serving thread that notices
//! queues one ask for more on the snapshot stream (`subscribe`), without waiting, as long as
//! the control plane has plenty left (its last grant was more than asked); a request that
//! finds the pool short waits up to `--allowance-wait` for the answer.
//!
//! Hot path: one `ArcSwap` load and a hash lookup to find the key's pool, one
//! compare-and-swap on the pool and one `fetch_add` on what is in flight to admit, two
//! `fetch_add`s to settle. No lock anywhere on the request path.
//!
//! The control plane away: the pool is spent as long as the lease lasts
//! (`--allowance-lease` after the last message on the stream, renewed by the control plane
//! every third of it); when the pool runs out with no stream, or the lease has passed,
//! `--budget-when-away` decides: `refuse` (503 `budget_unavailable`, the default) or `serve`
//! (the spend is reported as always and counted once the control plane is back).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use sluice_proto::v1 as pb;
use tokio::sync::{Notify, mpsc};

use crate::usage::UsageSink;

/// What a budgeted request does when its key's allowance has run out and the control
/// plane cannot be asked for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenAway {
    /// 503 `budget_unavailable` with `Retry-After`: no spend the control plane did not grant.
    Refuse,
    /// Serve it; its usage is reported as always and the control plane counts it when it is
    /// back, refusing the key from then on if its budget is spent.
    Serve,
}

/// The replica's allowance settings.
#[derive(Debug, Clone, Copy)]
pub struct AllowanceOptions {
    pub lease: Duration,
    pub wait: Duration,
    pub when_away: WhenAway,
}

impl Default for AllowanceOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            wait: Duration::from_secs(1),
            when_away: WhenAway::Refuse,
        }
    }
}

/// How long an ask may go unanswered before a request asks again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(1);

/// How long an `exhausted` answer stands before a request asks again.
const EXHAUSTED_FOR: Duration = Duration::from_secs(1);

/// Asks queued for the stream at most (one per key at a time).
const ASK_QUEUE: usize = 4_096;

/// What a request's record names as the period that paid for it when a lifetime budget's
/// grant did ([`Reservation::period_start_ms`]): 0 is also "none" (served away, or a replica
/// older than the field), which the control plane charges by the record's day. A control
/// plane older than this value reads it as "none", as before.
pub const LIFETIME: i64 = sluice_proto::LIFETIME_BUDGET_PERIOD;

/// Most held allowances a hello names: it keeps the hello near `MAX_SNAPSHOT_ACK_BYTES`.
const MAX_HELD: usize = 800;

/// One key's pool.
#[derive(Debug)]
pub struct Pool {
    /// Money granted and not yet taken by a request (nano-units); negative: a debt.
    available: AtomicI64,
    /// Reserves of admitted requests not yet settled.
    in_flight: AtomicI64,
    /// The budget period of the grants (Unix ms; 0: lifetime).
    period_start_ms: AtomicI64,
    /// How many times the pool was voided within its period (a budget lowered): the reserves
    /// of requests admitted before are void with it.
    voids: AtomicU64,
    last_grant: AtomicI64,
    /// What the latest ask asked for.
    last_want: AtomicI64,
    /// The latest grant was more than was asked: the control plane has plenty left, so a
    /// request asks for more before the pool runs out. Near the end of a budget it grants
    /// only what is asked, and money asked ahead would sit in this pool while another
    /// replica is refused: then requests ask only when the pool cannot cover them.
    roomy: AtomicBool,
    /// When the ask on its way was queued (ms since the registry's start + 1; 0: none).
    asking: AtomicU64,
    /// Asks queued on this stream and not answered yet. The control plane answers each ask
    /// once, in order.
    unanswered: AtomicU64,
    /// Of the next answers, how many answer asks made before the latest snapshot: their
    /// `exhausted` may speak of a period since reset or a budget since raised, and is not
    /// believed (the request asks again instead of being refused for a second).
    stale: AtomicU64,
    /// When the control plane last answered that nothing could be granted (ms since the
    /// registry's start + 1; 0: not exhausted).
    exhausted_at: AtomicU64,
    /// What that answer refused (the ask's want): a request that needs less may still be
    /// granted, and asks.
    exhausted_want: AtomicI64,
    /// The wants of the asks not answered yet, oldest first: the control plane answers in
    /// order, so an answer is to the first (an ask made again after a second's silence
    /// may be answered after a later, smaller one was made).
    wants: std::sync::Mutex<std::collections::VecDeque<i64>>,
    changed: Notify,
    /// For the refusal's message: the budget and when it resets (read only on a refusal).
    words: std::sync::Mutex<(f64, Option<SystemTime>)>,
}

impl Pool {
    fn new(max_budget: f64, resets: Option<SystemTime>) -> Self {
        Self {
            available: AtomicI64::new(0),
            in_flight: AtomicI64::new(0),
            period_start_ms: AtomicI64::new(0),
            voids: AtomicU64::new(0),
            last_grant: AtomicI64::new(0),
            last_want: AtomicI64::new(0),
            roomy: AtomicBool::new(false),
            asking: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            exhausted_at: AtomicU64::new(0),
            exhausted_want: AtomicI64::new(0),
            wants: std::sync::Mutex::new(std::collections::VecDeque::new()),
            changed: Notify::new(),
            words: std::sync::Mutex::new((max_budget, resets)),
        }
    }

    /// What an ask for a request reserving `reserve` asks for: the reserve and the pool's
    /// debt (a grant pays the debt first), at least 1.
    fn want(&self, reserve: i64) -> i64 {
        let debt = self.available().min(0);
        reserve.saturating_sub(debt).max(1)
    }

    /// Takes `reserve` from the pool if it covers it (at least one nano-unit must be there).
    fn try_take(&self, reserve: i64) -> bool {
        let need = reserve.max(1);
        let mut current = self.available.load(Ordering::Acquire);
        loop {
            if current < need {
                return false;
            }
            match self.available.compare_exchange_weak(
                current,
                current - reserve,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.in_flight.fetch_add(reserve, Ordering::AcqRel);
        true
    }

    /// What is left of the pool.
    pub fn available(&self) -> i64 {
        self.available.load(Ordering::Acquire)
    }
}

/// An admitted request's hold on its key's pool, settled with its real cost when it ends.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<Pool>,
    reserve: i64,
    settled: bool,
    /// The budget period the pool was in when the request was admitted.
    period_start_ms: i64,
    /// The pool's voids then ([`Pool::voids`]).
    voids: u64,
    /// Admitted while the control plane was away (`--budget-when-away serve`), on no grant.
    away: bool,
}

impl Reservation {
    /// The request cost `cost` nano-units: the pool gives back its reserve and takes that.
    pub fn settle(mut self, cost: u64) {
        self.settle_with(cost);
    }

    fn settle_with(&mut self, cost: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let cost = i64::try_from(cost).unwrap_or(i64::MAX);
        // A request admitted before the period reset settles nothing into the new period's
        // money: the old period's is void on both sides, and the control plane charges the
        // request's record to the period it was spent in. (Settled into the new pool, a
        // reserve given back was money never granted for this period, and a cost above it a
        // debt of the last.)
        let same_period = self.pool.period_start_ms.load(Ordering::Acquire) == self.period_start_ms;
        // The request's record is in the usage queue by now, and a hello reads the pools
        // before the records: a request settling meanwhile is counted twice, never missed.
        if same_period {
            // A reserve voided with the pool (the budget was lowered while the request ran)
            // is not given back: the control plane voided it with its grants, and charges the
            // request's whole cost against what it grants next. (Given back, it was money no
            // grant counted, spent past the lowered budget.)
            let voided = self.pool.voids.load(Ordering::Acquire) != self.voids;
            let back = if voided { 0 } else { self.reserve };
            self.pool
                .available
                .fetch_sub(cost.saturating_sub(back), Ordering::AcqRel);
        }
        self.pool
            .in_flight
            .fetch_sub(self.reserve, Ordering::AcqRel);
    }

    pub fn reserve(&self) -> i64 {
        self.reserve
    }

    /// The budget period whose money the request was admitted on (Unix ms of its start;
    /// [`LIFETIME`] for a lifetime budget's; 0 for a request served while the control plane
    /// was away, on no grant), which its record names so that the control plane files its
    /// cost there whatever this replica's clock says, and charges it to that period's grants
    /// alone. Away, the pool's period may be one the control plane has left (a UTC midnight
    /// passed meanwhile): its record is filed by its date, in the period the control plane is
    /// in.
    pub fn period_start_ms(&self) -> i64 {
        match (self.away, self.period_start_ms) {
            (true, _) => 0,
            (false, 0) => LIFETIME,
            (false, start) => start,
        }
    }
}

impl Drop for Reservation {
    /// A request that ends without being settled (it cannot: accounting always settles)
    /// keeps its reserve spent.
    fn drop(&mut self) {
        let reserve = self.reserve.max(0) as u64;
        self.settle_with(reserve);
    }
}

/// Why a budgeted request is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Refusal {
    /// The control plane has nothing left to grant that covers the request.
    Exhausted {
        max_budget: f64,
        resets: Option<SystemTime>,
    },
    /// The pool is empty and the control plane cannot be asked (`--budget-when-away
    /// refuse`).
    Unavailable { retry_after: Duration },
}

/// An ask for more of a key's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub client_key_id: String,
    pub want_nanos: u64,
    /// Of `want_nanos`, the pool's debt ([`pb::AllowanceRequest::debt_nanos`]).
    pub debt_nanos: u64,
}

/// Every budgeted key's pool on this replica, and the state of the stream they are granted
/// on. One per process, shared by the serving threads and the snapshot subscriber.
pub struct Allowances {
    pools: ArcSwap<HashMap<String, Arc<Pool>>>,
    options: AllowanceOptions,
    asks: mpsc::Sender<Ask>,
    queued: tokio::sync::Mutex<mpsc::Receiver<Ask>>,
    /// The control plane on the stream grants allowances (it said so before its first
    /// snapshot); sticky while it is away, so its pools keep being enforced.
    granting: AtomicBool,
    /// A snapshot stream is open.
    connected: AtomicBool,
    /// When the last message arrived on it (ms since `started` + 1; 0: never).
    last_heard: AtomicU64,
    started: Instant,
    usage: UsageSink,
    incarnation: String,
    /// Asks queued for the stream so far (for the metrics).
    asks_sent: AtomicU64,
}

impl Allowances {
    pub fn new(options: AllowanceOptions, usage: UsageSink, incarnation: String) -> Arc<Self> {
        let (asks, queued) = mpsc::channel(ASK_QUEUE);
        Arc::new(Self {
            pools: ArcSwap::default(),
            options,
            asks,
            queued: tokio::sync::Mutex::new(queued),
            granting: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            last_heard: AtomicU64::new(0),
            started: Instant::now(),
            usage,
            incarnation,
            asks_sent: AtomicU64::new(0),
        })
    }

    /// Asks for more of a key's budget queued for the control plane so far.
    pub fn asks_sent(&self) -> u64 {
        self.asks_sent.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> AllowanceOptions {
        self.options
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn lease_valid(&self) -> bool {
        let heard = self.last_heard.load(Ordering::Acquire);
        heard != 0 && self.now_ms().saturating_sub(heard) < self.options.lease.as_millis() as u64
    }

    /// The pool of `key_id`, if it has a budget (by the last snapshot applied).
    pub fn pool(&self, key_id: &str) -> Option<Arc<Pool>> {
        self.pools.load().get(key_id).cloned()
    }

    /// Admits a request of `key_id` reserving `reserve` nano-units: `Ok(None)` when the key
    /// has no budget or the control plane grants no allowances (an older one: then only its
    /// `budget_spent` flag is enforced).
    pub async fn admit(
        self: &Arc<Self>,
        key_id: &str,
        reserve: u64,
    ) -> Result<Option<Reservation>, Refusal> {
        if !self.granting.load(Ordering::Acquire) {
            return Ok(None);
        }
        let Some(pool) = self.pool(key_id) else {
            return Ok(None);
        };
        let reserve = i64::try_from(reserve).unwrap_or(i64::MAX);
        let deadline = tokio::time::Instant::now() + self.options.wait;
        loop {
            let changed = pool.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Read before the take below: see the reservation's.
            let period_start_ms = pool.period_start_ms.load(Ordering::Acquire);
            let voids = pool.voids.load(Ordering::Acquire);
            if !self.lease_valid() {
                // Money of a lease that ran out is the control plane's again.
                let _ = pool
                    .available
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                        (a > 0).then_some(0)
                    });
            } else if pool.try_take(reserve) {
                let left = pool.available();
                if pool.roomy.load(Ordering::Acquire)
                    && left < pool.last_grant.load(Ordering::Acquire) / 2
                {
                    self.ask(key_id, &pool, reserve);
                }
                return Ok(Some(Reservation {
                    pool: Arc::clone(&pool),
                    reserve,
                    settled: false,
                    // Read before the take: a reset or a void between the two voids the
                    // request's settlement (the new pool keeps its reserve), never gives the
                    // new period or the lowered budget money it was not granted.
                    period_start_ms,
                    voids,
                    away: false,
                }));
            }
            // Refused only if the control plane refused as much or less: a large request's
            // refusal does not refuse the key's small ones, which it may still grant.
            let exhausted = pool.exhausted_at.load(Ordering::Acquire);
            if exhausted != 0
                && self.now_ms().saturating_sub(exhausted) < EXHAUSTED_FOR.as_millis() as u64
                && pool.want(reserve) >= pool.exhausted_want.load(Ordering::Acquire)
            {
                let (max_budget, resets) = *pool.words.lock().unwrap_or_else(|p| p.into_inner());
                return Err(Refusal::Exhausted { max_budget, resets });
            }
            if !self.connected.load(Ordering::Acquire) {
                return self.away(Arc::clone(&pool));
            }
            self.ask(key_id, &pool, reserve);
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.away(Arc::clone(&pool));
            }
        }
    }

    /// The pool cannot be refilled in time: `--budget-when-away` decides.
    fn away(&self, pool: Arc<Pool>) -> Result<Option<Reservation>, Refusal> {
        match self.options.when_away {
            WhenAway::Refuse => Err(Refusal::Unavailable {
                retry_after: Duration::from_secs(1),
            }),
            // Reserves nothing; the cost is still settled into the pool (a debt).
            WhenAway::Serve => Ok(Some(Reservation {
                period_start_ms: pool.period_start_ms.load(Ordering::Acquire),
                voids: pool.voids.load(Ordering::Acquire),
                pool,
                reserve: 0,
                settled: false,
                away: true,
            })),
        }
    }

    /// Queues one ask for `key_id` unless one is queued or on its way already (an ask left
    /// unanswered for [`ASK_AGAIN_AFTER`] is made again). It asks for `want` and the pool's
    /// debt ([`Pool::want`]): a grant pays the debt first, so an ask for `want` alone would
    /// leave a pool in debt short, and its request asking again and again until its wait ran
    /// out.
    fn ask(&self, key_id: &str, pool: &Pool, want: i64) {
        let now = self.now_ms();
        let asked = pool.asking.load(Ordering::Acquire);
        if asked != 0 && now.saturating_sub(asked) < ASK_AGAIN_AFTER.as_millis() as u64 {
            return;
        }
        if pool
            .asking
            .compare_exchange(asked, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // another thread is asking
        }
        let debt = pool.available().min(0).unsigned_abs();
        let want = pool.want(want);
        pool.last_want.store(want, Ordering::Release);
        let ask = Ask {
            client_key_id: key_id.to_owned(),
            want_nanos: want as u64,
            debt_nanos: debt.min(want as u64),
        };
        if self.asks.try_send(ask).is_err() {
            pool.asking.store(0, Ordering::Release);
        } else {
            pool.wants
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push_back(want);
            pool.unanswered.fetch_add(1, Ordering::AcqRel);
            self.asks_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A snapshot was applied: `keys` are its keys with a budget (id, budget, reset). Pools
    /// of keys still budgeted carry over; an `exhausted` answer is forgotten (the budget may
    /// have been raised).
    pub fn budgeted(&self, keys: Vec<(String, f64, Option<SystemTime>, Option<i64>)>) {
        let current = self.pools.load();
        let mut next = HashMap::with_capacity(keys.len());
        for (id, max_budget, resets, period_start) in keys {
            let pool = match current.get(&id) {
                Some(pool) => {
                    // Same money (requests in flight settle into it), perhaps new words.
                    let old = std::mem::replace(
                        &mut *pool.words.lock().unwrap_or_else(|p| p.into_inner()),
                        (max_budget, resets),
                    );
                    // A budget lowered, or a lifetime budget made periodic before any grant of
                    // its period came: the money granted under the old terms is void, as the
                    // control plane voids its grants at its next ask (kept, it was spent
                    // against the new budget, which it could pass many times over). Requests
                    // in flight still settle their cost into the pool, without their
                    // reserves, void with it.
                    let lifetime_money = old.1.is_none()
                        && resets.is_some()
                        && pool.period_start_ms.load(Ordering::Acquire) == 0;
                    if max_budget < old.0 || lifetime_money {
                        pool.voids.fetch_add(1, Ordering::AcqRel);
                        let _ =
                            pool.available
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                                    (a > 0).then_some(0)
                                });
                    }
                    if let Some(start) = period_start {
                        // The period's start, as the control plane voids by it: money of
                        // another period is void (a reset; a lifetime budget made periodic; a
                        // periodic one made lifetime, start 0; a daily budget made weekly on
                        // a Wednesday, whose week began before Wednesday's money: kept, it was
                        // spent while the control plane counted none of it held). Kept: money
                        // of this period, also when the period's kind changed and its start
                        // did not (daily made weekly on a Monday), and of a later one than
                        // this snapshot's (a grant that came before it: at or past its end).
                        let held = pool.period_start_ms.load(Ordering::Acquire);
                        let later = resets.is_some_and(|end| held >= system_time_ms(end));
                        if held != start && !later {
                            pool.period_start_ms.store(start, Ordering::Release);
                            pool.available.store(0, Ordering::Release);
                        }
                    } else if old.1.is_some() && old.1 != resets {
                        // A new period: the old one's money is void, here as at the control
                        // plane, which counts this replica as holding none of the new period's
                        // from its first ask in it. Kept, it was spent on this period's
                        // requests uncounted by every grant, up to a pool (1.5 grants) a
                        // replica past the budget at every reset. What the old period's
                        // requests ran past their grants was spent in the old one, and is not
                        // asked for in this one either. (Unless its money is the new
                        // period's already: a grant of it came before this snapshot.)
                        let new_period_start = old.1.map_or(i64::MAX, system_time_ms);
                        if pool.period_start_ms.load(Ordering::Acquire) < new_period_start {
                            // The pool is the new period's from now: a request of the old
                            // one settling later gives nothing back into it, and the new
                            // period's first grant adds to it.
                            pool.period_start_ms
                                .store(new_period_start, Ordering::Release);
                            pool.available.store(0, Ordering::Release);
                        }
                    }
                    Arc::clone(pool)
                }
                None => Arc::new(Pool::new(max_budget, resets)),
            };
            pool.exhausted_at.store(0, Ordering::Release);
            pool.stale
                .store(pool.unanswered.load(Ordering::Acquire), Ordering::Release);
            next.insert(id, pool);
        }
        self.pools.store(Arc::new(next));
    }

    /// The fields of the hello that concern allowances: what this replica holds of each
    /// key's budget (its pool, its reserves in flight, its records not yet acked).
    pub fn hello(&self, hello: &mut pb::StreamSnapshotsRequest) {
        if !self.lease_valid() {
            for pool in self.pools.load().values() {
                let _ = pool
                    .available
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                        (a > 0).then_some(0)
                    });
            }
        }
        // Pools and reserves first, records after: a request settling in between is
        // counted twice (in its reserve and its record), never missed.
        let pools = self.pools.load();
        let mut held: HashMap<&str, (i64, i64)> = pools
            .iter()
            .map(|(id, pool)| {
                let available = pool.available().max(0);
                let in_flight = pool.in_flight.load(Ordering::Acquire).max(0);
                (
                    id.as_str(),
                    (
                        available.saturating_add(in_flight),
                        pool.period_start_ms.load(Ordering::Acquire),
                    ),
                )
            })
            .collect();
        let (acked, unacked) = self.usage.unacked_cost_by_key();
        for (key, cost) in &unacked {
            if let Some((nanos, _)) = held.get_mut(key.as_str()) {
                *nanos = nanos.saturating_add(i64::try_from(*cost).unwrap_or(i64::MAX));
            }
        }
        let mut held: Vec<pb::HeldAllowance> = held
            .into_iter()
            .filter(|(_, (nanos, _))| *nanos > 0)
            .map(|(id, (nanos, period))| pb::HeldAllowance {
                client_key_id: id.to_owned(),
                period_start_ms: period,
                held_nanos: nanos as u64,
            })
            .collect();
        held.sort_by_key(|h| std::cmp::Reverse(h.held_nanos));
        held.truncate(MAX_HELD);
        // The control plane counts nothing held for a key the hello does not name (past the
        // largest MAX_HELD): those pools are emptied, their keys asking again, as it sees
        // them. Kept, they were spent on while the control plane granted their money again
        // to other replicas, at every reconnect of the stream.
        if held.len() == MAX_HELD {
            let named: std::collections::HashSet<&str> =
                held.iter().map(|h| h.client_key_id.as_str()).collect();
            for (id, pool) in pools.iter() {
                if !named.contains(id.as_str()) {
                    let _ = pool
                        .available
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                            (a > 0).then_some(0)
                        });
                }
            }
        }
        hello.accepts_allowances = true;
        hello.incarnation.clone_from(&self.incarnation);
        hello.allowance_lease = Some(crate::clock::proto_duration(self.options.lease));
        hello.held_allowances = held;
        hello.usage_acked_sequence = acked;
        // What the hello says is held is what the pools hold from now on: a debt served
        // while away is in the records the control plane will count.
        for pool in pools.values() {
            let _ = pool
                .available
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                    (a < 0).then_some(0)
                });
            pool.asking.store(0, Ordering::Release);
        }
    }

    /// The asks queued for the stream; held by one stream at a time.
    pub async fn queued(&self) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<Ask>> {
        let mut queued = self.queued.lock().await;
        // Asks of an earlier stream went unanswered; their keys ask again.
        while queued.try_recv().is_ok() {}
        queued
    }

    /// The stream opened (`true`) or ended.
    pub fn connected(&self, open: bool) {
        self.connected.store(open, Ordering::Release);
        if !open {
            for pool in self.pools.load().values() {
                // The asks of a closed stream are never answered.
                pool.unanswered.store(0, Ordering::Release);
                pool.wants.lock().unwrap_or_else(|p| p.into_inner()).clear();
                pool.stale.store(0, Ordering::Release);
                pool.asking.store(0, Ordering::Release);
                pool.changed.notify_waiters();
            }
        }
    }

    /// A message arrived on the stream: the lease runs from now. A snapshot that came
    /// before any allowance message on this stream is from a control plane that grants
    /// none.
    pub fn heard(&self, allowances: Option<&pb::AllowanceUpdate>, first_on_stream: bool) {
        self.last_heard.store(self.now_ms(), Ordering::Release);
        match allowances {
            Some(update) => {
                self.granting.store(true, Ordering::Release);
                self.granted(update);
            }
            None if first_on_stream => self.granting.store(false, Ordering::Release),
            None => {}
        }
    }

    fn granted(&self, update: &pb::AllowanceUpdate) {
        let pools = self.pools.load();
        for grant in &update.allowances {
            let Some(pool) = pools.get(&grant.client_key_id) else {
                continue;
            };
            let nanos = i64::try_from(grant.granted_nanos).unwrap_or(i64::MAX);
            // Nothing granted and not exhausted: the control plane could not read the budget
            // (every other answer grants at least what was asked, or is exhausted). Such an
            // answer names no period (its 0 is no lifetime budget): the pool is left as it is,
            // not voided as a new period's.
            let unread = nanos == 0 && !grant.exhausted;
            if !unread
                && pool
                    .period_start_ms
                    .swap(grant.period_start_ms, Ordering::AcqRel)
                    != grant.period_start_ms
            {
                // A new period: the old one's money is void.
                pool.available.store(nanos, Ordering::Release);
            } else if nanos > 0 {
                pool.available.fetch_add(nanos, Ordering::AcqRel);
            }
            if nanos > 0 {
                pool.last_grant.store(nanos, Ordering::Release);
                pool.roomy.store(
                    nanos > pool.last_want.load(Ordering::Acquire),
                    Ordering::Release,
                );
            }
            let _ = pool
                .unanswered
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            let stale = pool
                .stale
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
            let exhausted = if grant.exhausted && !stale {
                self.now_ms()
            } else {
                0
            };
            let answered = pool
                .wants
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            pool.exhausted_want.store(
                answered.unwrap_or_else(|| pool.last_want.load(Ordering::Acquire)),
                Ordering::Release,
            );
            pool.exhausted_at.store(exhausted, Ordering::Release);
            pool.asking.store(0, Ordering::Release);
            pool.changed.notify_waiters();
        }
    }
}

/// `t` in milliseconds since the epoch (0 before it, the largest after its range).
pub(crate) fn system_time_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn grant(key: &str, nanos: u64, exhausted: bool) -> pb::AllowanceUpdate {
        pb::AllowanceUpdate {
            allowances: vec![pb::Allowance {
                client_key_id: key.into(),
                granted_nanos: nanos,
                period_start_ms: 0,
                exhausted,
            }],
        }
    }

    fn allowances(when_away: WhenAway) -> Arc<Allowances> {
        let a = Allowances::new(
            AllowanceOptions {
                lease: Duration::from_secs(60),
                wait: Duration::from_millis(200),
                when_away,
            },
            UsageSink::new(100),
            "inc".into(),
        );
        a.budgeted(vec![("k".into(), 1.0, None, None)]);
        a.connected(true);
        a.heard(Some(&pb::AllowanceUpdate::default()), true);
        a
    }

    #[tokio::test]
    async fn requests_spend_the_pool_and_settle_their_real_cost() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 1_000, false)), false);
        assert!(a.admit("other", 5).await.unwrap().is_none(), "no budget");
        let r = a.admit("k", 300).await.unwrap().unwrap();
        assert_eq!(a.pool("k").unwrap().available(), 700);
        r.settle(450);
        assert_eq!(a.pool("k").unwrap().available(), 550);
        let r = a.admit("k", 500).await.unwrap().unwrap();
        r.settle(100);
        assert_eq!(a.pool("k").unwrap().available(), 450);
        // Below half of the last grant: one ask is queued, not two.
        let mut queued = a.queued.lock().await;
        assert_eq!(
            queued.try_recv().unwrap(),
            Ask {
                client_key_id: "k".into(),
                want_nanos: 500,
                debt_nanos: 0,
            }
        );
        assert!(queued.try_recv().is_err());
    }

    /// A request admitted before its key's budget period reset settles nothing into the new
    /// period's pool: its reserve was the old period's money (void), and its cost the
    /// control plane charges to the old period.
    #[tokio::test]
    async fn a_request_admitted_before_a_reset_settles_nothing_into_the_new_period() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 1_000, false)), false);
        let given_back = a.admit("k", 300).await.unwrap().unwrap();
        let over = a.admit("k", 300).await.unwrap().unwrap();
        let next_day = |nanos| {
            let mut update = grant("k", nanos, false);
            update.allowances[0].period_start_ms = 86_400_000;
            update
        };
        a.heard(Some(&next_day(500)), false);
        assert_eq!(a.pool("k").unwrap().available(), 500);
        // Ended with an upstream error (cost 0): its reserve is not the new period's money.
        given_back.settle(0);
        assert_eq!(a.pool("k").unwrap().available(), 500);
        // Cost more than its reserve: no debt for the new period either.
        over.settle(2_000);
        assert_eq!(a.pool("k").unwrap().available(), 500);
        // A request of the new period settles as ever.
        a.admit("k", 100).await.unwrap().unwrap().settle(150);
        assert_eq!(a.pool("k").unwrap().available(), 350);
    }

    #[tokio::test]
    async fn an_empty_pool_waits_for_the_answer_and_an_exhausted_budget_refuses() {
        let a = allowances(WhenAway::Refuse);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 10).await.map(|r| r.map(|r| r.reserve())) }
        });
        let ask = a.queued.lock().await.recv().await.unwrap();
        assert_eq!(ask.want_nanos, 10);
        a.heard(Some(&grant("k", 40, false)), false);
        assert_eq!(waiting.await.unwrap(), Ok(Some(10)));
        assert_eq!(a.pool("k").unwrap().available(), 30);

        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 31).await.map(|r| r.is_some()) }
        });
        a.queued.lock().await.recv().await.unwrap();
        a.heard(Some(&grant("k", 0, true)), false);
        assert!(matches!(
            waiting.await.unwrap(),
            Err(Refusal::Exhausted { .. })
        ));
        // What is left still admits what it covers.
        assert!(a.admit("k", 30).await.unwrap().is_some());
    }

    /// A refusal of one large request leaves the key's smaller ones free to ask (the control
    /// plane may still grant them) within the second it stands; one as large or larger is
    /// refused at once, without asking again.
    #[tokio::test]
    async fn an_exhausted_answer_refuses_only_requests_as_large_as_it_refused() {
        let a = allowances(WhenAway::Refuse);
        let large = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 1_000).await.map(|r| r.is_some()) }
        });
        let mut queued = a.queued.lock().await;
        assert_eq!(queued.recv().await.unwrap().want_nanos, 1_000);
        a.heard(Some(&grant("k", 0, true)), false);
        assert!(matches!(
            large.await.unwrap(),
            Err(Refusal::Exhausted { .. })
        ));
        assert!(matches!(
            a.admit("k", 1_500).await,
            Err(Refusal::Exhausted { .. })
        ));
        assert!(queued.try_recv().is_err(), "no ask for a larger one");
        let small = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 10).await.map(|r| r.map(|r| r.reserve())) }
        });
        assert_eq!(queued.recv().await.unwrap().want_nanos, 10);
        a.heard(Some(&grant("k", 10, false)), false);
        assert_eq!(small.await.unwrap(), Ok(Some(10)));
    }

    /// An `exhausted` answer to a large ask that came after a second's silence, when a
    /// smaller ask had been made meanwhile, refuses as much as that large ask wanted: the
    /// smaller one's answer is still to come.
    #[tokio::test]
    async fn an_exhausted_answer_counts_against_the_ask_it_answers() {
        let a = allowances(WhenAway::Refuse);
        let mut queued = a.queued.lock().await;
        let pool = a.pool("k").unwrap();
        a.ask("k", &pool, 1_000);
        assert_eq!(queued.recv().await.unwrap().want_nanos, 1_000);
        // A second's silence: the next request asks again (as `ask` lets it then).
        pool.asking.store(0, Ordering::Release);
        a.ask("k", &pool, 10);
        assert_eq!(queued.recv().await.unwrap().want_nanos, 10);
        // The answer to the first ask.
        a.heard(Some(&grant("k", 0, true)), false);
        assert_eq!(pool.exhausted_want.load(Ordering::Acquire), 1_000);
        // A request of 500 is not refused by it: it waits for the answer to the second.
        let middle = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 500).await.map(|r| r.is_some()) }
        });
        tokio::task::yield_now().await;
        a.heard(Some(&grant("k", 500, false)), false);
        assert_eq!(middle.await.unwrap(), Ok(true));
    }

    /// A budget lowered (or a lifetime budget made daily) voids the pool granted under the
    /// old terms; one raised keeps it.
    #[tokio::test]
    async fn a_lowered_budget_voids_the_pool_a_raised_one_keeps_it() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 100, false)), false);
        a.budgeted(vec![("k".into(), 2.0, None, None)]);
        assert_eq!(a.pool("k").unwrap().available(), 100, "raised");
        a.budgeted(vec![("k".into(), 0.5, None, None)]);
        assert_eq!(a.pool("k").unwrap().available(), 0, "lowered");
        a.heard(Some(&grant("k", 100, false)), false);
        let midnight = SystemTime::UNIX_EPOCH + Duration::from_secs(1_765_065_600);
        a.budgeted(vec![("k".into(), 0.5, Some(midnight), None)]);
        assert_eq!(a.pool("k").unwrap().available(), 0, "lifetime made daily");
    }

    /// The reserve of a request admitted before a budget was lowered is void with the pool:
    /// when the request ends, the pool takes its whole cost, as the control plane (which
    /// voided its grants, those reserves with them) charges it to the next grant. Given back
    /// into the pool, the reserves of the requests in flight were money no grant counted,
    /// spent past the lowered budget.
    #[tokio::test]
    async fn a_reserve_admitted_before_a_budget_was_lowered_is_void_with_the_pool() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 1_000, false)), false);
        let running = a.admit("k", 600).await.unwrap().unwrap();
        let kept = a.admit("k", 100).await.unwrap().unwrap();
        a.budgeted(vec![("k".into(), 0.5, None, None)]);
        assert_eq!(a.pool("k").unwrap().available(), 0, "lowered");
        running.settle(100);
        assert_eq!(a.pool("k").unwrap().available(), -100, "its whole cost");
        // A request admitted on money granted after the void settles as ever.
        a.heard(Some(&grant("k", 300, false)), false);
        let after = a.admit("k", 150).await.unwrap().unwrap();
        after.settle(50);
        assert_eq!(a.pool("k").unwrap().available(), 200 - 50);
        drop(kept);
    }

    /// An answer the control plane gives when it could not read the budget (nothing granted,
    /// not exhausted, no period) leaves a daily key's pool as it was: read as a new period it
    /// voided the pool, and the key was refused while the control plane counted that money
    /// as held.
    #[tokio::test]
    async fn an_answer_without_a_budget_read_leaves_the_pool_as_it_was() {
        let a = allowances(WhenAway::Refuse);
        let day = pb::AllowanceUpdate {
            allowances: vec![pb::Allowance {
                period_start_ms: 1_764_979_200_000,
                ..grant("k", 100, false).allowances[0].clone()
            }],
        };
        a.heard(Some(&day), false);
        assert_eq!(a.pool("k").unwrap().available(), 100);
        let unread = pb::AllowanceUpdate {
            allowances: vec![pb::Allowance {
                client_key_id: "k".into(),
                ..Default::default()
            }],
        };
        a.heard(Some(&unread), false);
        assert_eq!(a.pool("k").unwrap().available(), 100);
        assert!(a.admit("k", 60).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_pool_in_debt_asks_for_the_debt_and_the_reserve_at_once() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 100, false)), false);
        // A completion costs far more than its reserve: the pool owes 200.
        a.admit("k", 40).await.unwrap().unwrap().settle(300);
        assert_eq!(a.pool("k").unwrap().available(), -200);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 10).await.map(|r| r.map(|r| r.reserve())) }
        });
        let mut queued = a.queued.lock().await;
        let ask = queued.recv().await.unwrap();
        assert_eq!(ask.want_nanos, 210, "the debt and the reserve");
        assert_eq!(ask.debt_nanos, 200, "of it, the debt");
        a.heard(Some(&grant("k", 210, false)), false);
        assert_eq!(waiting.await.unwrap(), Ok(Some(10)), "one answer admits it");
    }

    /// Near the end of a budget the control plane grants only what is asked: a replica
    /// that asked ahead would hold money another replica is refused for.
    #[tokio::test]
    async fn near_the_end_of_a_budget_a_pool_asks_only_for_a_request_it_cannot_cover() {
        let a = allowances(WhenAway::Refuse);
        let mut queued = a.queued.lock().await;
        let admit = |reserve| {
            let a = Arc::clone(&a);
            tokio::spawn(async move { a.admit("k", reserve).await.map(|r| r.is_some()) })
        };
        let waiting = admit(10);
        assert_eq!(queued.recv().await.unwrap().want_nanos, 10);
        a.heard(Some(&grant("k", 10, false)), false);
        assert_eq!(waiting.await.unwrap(), Ok(true));
        assert!(queued.try_recv().is_err(), "no ask ahead of need");
        // Plenty left again (more granted than asked): the pool asks ahead once below half.
        let waiting = admit(10);
        assert_eq!(queued.recv().await.unwrap().want_nanos, 10);
        a.heard(Some(&grant("k", 40, false)), false);
        assert_eq!(waiting.await.unwrap(), Ok(true));
        assert_eq!(admit(10).await.unwrap(), Ok(true));
        assert!(queued.try_recv().is_err(), "20 left of 40: not below half");
        assert_eq!(admit(10).await.unwrap(), Ok(true));
        assert_eq!(queued.try_recv().unwrap().want_nanos, 10);
    }

    #[tokio::test]
    async fn a_new_period_does_not_ask_for_the_old_periods_debt() {
        let a = allowances(WhenAway::Refuse);
        let day = |d: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * d));
        a.budgeted(vec![("k".into(), 1.0, day(1), None)]);
        a.heard(Some(&grant("k", 100, false)), false);
        a.admit("k", 40).await.unwrap().unwrap().settle(300);
        assert_eq!(a.pool("k").unwrap().available(), -200);
        // The same period's snapshot keeps the debt; the next period's voids it.
        a.budgeted(vec![("k".into(), 2.0, day(1), None)]);
        assert_eq!(a.pool("k").unwrap().available(), -200);
        a.budgeted(vec![("k".into(), 2.0, day(2), None)]);
        assert_eq!(a.pool("k").unwrap().available(), 0);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 10).await.map(|r| r.is_some()) }
        });
        let ask = a.queued.lock().await.recv().await.unwrap();
        assert_eq!(ask.want_nanos, 10, "the reserve alone");
        a.heard(Some(&grant("k", 10, false)), false);
        assert_eq!(waiting.await.unwrap(), Ok(true));
    }

    /// With the period's start in the snapshot, a pool's money is void when its period's start
    /// moves, as the control plane voids its grants, not whenever the reset time changes: a
    /// budget made weekly from daily on a Monday keeps its start and its money (voided here
    /// while the control plane kept counting it as held, it was lost to the key for the rest
    /// of the week), and so does a grant of the new kind's period that came before the
    /// snapshot; a reset, and a budget made lifetime, void it.
    #[tokio::test]
    async fn a_pool_is_void_when_its_period_starts_anew_not_when_its_kind_changes() {
        const DAY: i64 = 86_400_000;
        let a = allowances(WhenAway::Refuse);
        let at = |ms: i64| Some(SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64));
        let grant_of = |nanos, start| {
            let mut update = grant("k", nanos, false);
            update.allowances[0].period_start_ms = start;
            update
        };
        let available = || a.pool("k").unwrap().available();
        let monday = 20_000 * DAY;
        a.budgeted(vec![("k".into(), 1.0, at(monday + DAY), Some(monday))]);
        a.heard(Some(&grant_of(1_000, monday)), false);
        assert_eq!(available(), 1_000);
        a.budgeted(vec![("k".into(), 1.0, at(monday + 7 * DAY), Some(monday))]);
        assert_eq!(
            available(),
            1_000,
            "made weekly on the first day of its week"
        );
        // Made daily again on Wednesday, a grant of Wednesday's period having come first.
        let wednesday = monday + 2 * DAY;
        a.heard(Some(&grant_of(500, wednesday)), false);
        a.budgeted(vec![(
            "k".into(),
            1.0,
            at(wednesday + DAY),
            Some(wednesday),
        )]);
        assert_eq!(
            available(),
            500,
            "the new period's money, granted before its snapshot"
        );
        a.budgeted(vec![(
            "k".into(),
            1.0,
            at(wednesday + 2 * DAY),
            Some(wednesday + DAY),
        )]);
        assert_eq!(available(), 0, "Thursday's reset");
        a.heard(Some(&grant_of(300, wednesday + DAY)), false);
        a.budgeted(vec![("k".into(), 1.0, None, Some(0))]);
        assert_eq!(available(), 0, "made lifetime");
        a.heard(Some(&grant_of(200, 0)), false);
        a.budgeted(vec![("k".into(), 1.0, None, Some(0))]);
        assert_eq!(available(), 200, "lifetime money stays lifetime money");
        // Made daily on a Wednesday; a snapshot built before Wednesday's midnight comes after
        // Wednesday's grant: the money of a later period than the snapshot's is kept.
        a.budgeted(vec![(
            "k".into(),
            1.0,
            at(wednesday + DAY),
            Some(wednesday),
        )]);
        a.heard(Some(&grant_of(400, wednesday)), false);
        a.budgeted(vec![(
            "k".into(),
            1.0,
            at(wednesday),
            Some(wednesday - DAY),
        )]);
        assert_eq!(available(), 400, "a later period's money");
        // Made weekly on that Wednesday: the week began on Monday, before Wednesday's money,
        // which the control plane counts held no more.
        a.budgeted(vec![("k".into(), 1.0, at(monday + 7 * DAY), Some(monday))]);
        assert_eq!(available(), 0, "made weekly on a Wednesday");
        a.heard(Some(&grant_of(700, monday)), false);
        assert_eq!(available(), 700);
    }

    /// At a reset the control plane counts a replica as holding none of the new period's money
    /// from its first ask in it; a pool that kept the old period's money spent it on the new
    /// period's requests uncounted by any grant, past the budget by as much at every reset.
    /// Money of the new period already granted before the snapshot came stays.
    #[tokio::test]
    async fn a_new_period_voids_the_old_periods_money() {
        let a = allowances(WhenAway::Refuse);
        let day = |d: u64| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * d));
        a.budgeted(vec![("k".into(), 1.0, day(1), None)]);
        a.heard(Some(&grant("k", 1_000, false)), false);
        let running = a.admit("k", 300).await.unwrap().unwrap();
        a.budgeted(vec![("k".into(), 1.0, day(2), None)]);
        assert_eq!(a.pool("k").unwrap().available(), 0);
        // A request of the old period ending now gives its unused reserve back to nothing.
        running.settle(100);
        assert_eq!(a.pool("k").unwrap().available(), 0);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 900).await.map(|r| r.is_some()) }
        });
        assert_eq!(a.queued.lock().await.recv().await.unwrap().want_nanos, 900);
        let mut next_day = grant("k", 900, false);
        next_day.allowances[0].period_start_ms = 86_400_000;
        a.heard(Some(&next_day), false);
        assert_eq!(waiting.await.unwrap(), Ok(true));

        // The next reset's grant comes before its snapshot: that money is the new period's.
        let mut day_after = grant("k", 500, false);
        day_after.allowances[0].period_start_ms = 2 * 86_400_000;
        a.heard(Some(&day_after), false);
        a.budgeted(vec![("k".into(), 1.0, day(3), None)]);
        assert_eq!(a.pool("k").unwrap().available(), 500);
    }

    #[tokio::test]
    async fn an_exhausted_answer_to_an_ask_made_before_a_period_reset_does_not_refuse() {
        let a = allowances(WhenAway::Refuse);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 10).await.map(|r| r.map(|r| r.reserve())) }
        });
        // Asked in the old period; the reset's snapshot arrives before the answer.
        let mut queued = a.queued.lock().await;
        queued.recv().await.unwrap();
        a.budgeted(vec![("k".into(), 1.0, None, None)]);
        a.heard(Some(&grant("k", 0, true)), false);
        // The waiting request asks again at once, and is served from the new period.
        let ask = tokio::time::timeout(Duration::from_millis(150), queued.recv())
            .await
            .expect("asked again, not refused")
            .unwrap();
        assert_eq!(ask.want_nanos, 10);
        a.heard(Some(&grant("k", 100, false)), false);
        assert_eq!(waiting.await.unwrap(), Ok(Some(10)));
        // An exhausted answer to an ask made under the current snapshot is believed.
        a.pool("k").unwrap().available.store(0, Ordering::Release);
        let waiting = tokio::spawn({
            let a = Arc::clone(&a);
            async move { a.admit("k", 10).await.map(|r| r.is_some()) }
        });
        queued.recv().await.unwrap();
        a.heard(Some(&grant("k", 0, true)), false);
        assert!(matches!(
            waiting.await.unwrap(),
            Err(Refusal::Exhausted { .. })
        ));
    }

    #[tokio::test]
    async fn a_new_budget_keeps_the_pool_and_its_requests_in_flight() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 100, false)), false);
        let in_flight = a.admit("k", 40).await.unwrap().unwrap();
        a.budgeted(vec![("k".into(), 2.0, None, None)]);
        in_flight.settle(70);
        assert_eq!(
            a.pool("k").unwrap().available(),
            30,
            "settled into the same pool"
        );
        a.heard(Some(&grant("k", 0, true)), false);
        assert_eq!(
            a.admit("k", 31).await.unwrap_err(),
            Refusal::Exhausted {
                max_budget: 2.0,
                resets: None
            }
        );
    }

    #[tokio::test]
    async fn with_the_control_plane_away_the_setting_decides() {
        for when_away in [WhenAway::Refuse, WhenAway::Serve] {
            let a = allowances(when_away);
            a.heard(Some(&grant("k", 100, false)), false);
            a.connected(false);
            // The pool is spent while the lease lasts.
            a.admit("k", 60).await.unwrap().unwrap().settle(60);
            let outcome = a.admit("k", 60).await;
            match when_away {
                WhenAway::Refuse => {
                    assert!(matches!(outcome, Err(Refusal::Unavailable { .. })))
                }
                WhenAway::Serve => {
                    outcome.unwrap().unwrap().settle(60);
                    assert_eq!(a.pool("k").unwrap().available(), -20, "a debt");
                }
            }
        }
    }

    /// A request admitted on a grant names the grant's period, in which the control plane
    /// files its cost whatever this replica's clock says; one admitted on a lifetime budget's
    /// grant names [`LIFETIME`] (0 was also "no period", which the control plane charged by
    /// its day to the grants of a period the budget had just been given); one served while
    /// the control plane is away (`serve`) names none, as no grant paid for it and the pool's
    /// period may be one the control plane has left (a UTC midnight passed meanwhile): its
    /// cost is filed by its date, in the period the control plane is in.
    #[tokio::test]
    async fn a_request_names_the_period_of_the_grant_that_paid_for_it() {
        let a = allowances(WhenAway::Serve);
        a.heard(Some(&grant("k", 100, false)), false);
        let lifetime = a.admit("k", 60).await.unwrap().unwrap();
        assert_eq!(lifetime.period_start_ms(), LIFETIME);
        lifetime.settle(60);
        let mut update = grant("k", 100, false);
        update.allowances[0].period_start_ms = 86_400_000;
        a.heard(Some(&update), false);
        let granted = a.admit("k", 60).await.unwrap().unwrap();
        assert_eq!(granted.period_start_ms(), 86_400_000);
        granted.settle(60);
        a.connected(false);
        let away = a.admit("k", 60).await.unwrap().unwrap();
        assert_eq!(away.period_start_ms(), 0);
        away.settle(60);
    }

    /// With the control plane away, a replica spends what it holds for its lease, and then
    /// no more, however much it still holds: the refusal comes from the lease, not from an
    /// empty pool (the other tests' leases are a minute: none ran out). Its hello then holds
    /// nothing either: the control plane stopped counting that money when the lease ran out.
    #[tokio::test]
    async fn past_its_lease_a_replica_spends_nothing_it_holds() {
        let lease = Duration::from_millis(500);
        for when_away in [WhenAway::Refuse, WhenAway::Serve] {
            let a = Allowances::new(
                AllowanceOptions {
                    lease,
                    wait: Duration::from_millis(20),
                    when_away,
                },
                UsageSink::new(100),
                "inc".into(),
            );
            a.budgeted(vec![("k".into(), 1.0, None, None)]);
            a.connected(true);
            a.heard(Some(&grant("k", 1_000, false)), true);
            a.connected(false);
            a.admit("k", 10).await.unwrap().unwrap().settle(10);
            // The lease is timed by the monotonic clock the engine reads (std's, not tokio's).
            std::thread::sleep(lease * 2);
            let outcome = a.admit("k", 10).await;
            match when_away {
                WhenAway::Refuse => assert!(
                    matches!(outcome, Err(Refusal::Unavailable { .. })),
                    "990 held, the lease over: refused"
                ),
                WhenAway::Serve => assert!(outcome.unwrap().is_some(), "served, counted later"),
            }
            let mut hello = pb::StreamSnapshotsRequest::default();
            a.hello(&mut hello);
            assert!(hello.held_allowances.is_empty(), "{hello:?}");
        }
    }

    /// A hello names the largest pools only; those it leaves out are emptied, as the control
    /// plane counts nothing held for them: kept, they were spent on while their money was
    /// granted again to other replicas.
    #[tokio::test]
    async fn pools_a_hello_leaves_out_are_emptied() {
        let a = allowances(WhenAway::Refuse);
        let keys: Vec<String> = (0..=MAX_HELD).map(|i| format!("k{i}")).collect();
        a.budgeted(keys.iter().map(|k| (k.clone(), 1.0, None, None)).collect());
        for (i, key) in keys.iter().enumerate() {
            // The last key's pool the smallest.
            let nanos = 10_000 - i as u64;
            a.heard(Some(&grant(key, nanos, false)), false);
        }
        let mut hello = pb::StreamSnapshotsRequest::default();
        a.hello(&mut hello);
        assert_eq!(hello.held_allowances.len(), MAX_HELD);
        let left_out = &keys[MAX_HELD];
        assert!(
            hello
                .held_allowances
                .iter()
                .all(|h| &h.client_key_id != left_out)
        );
        assert_eq!(a.pool(left_out).unwrap().available(), 0);
        assert_eq!(a.pool(&keys[0]).unwrap().available(), 10_000);
    }

    #[tokio::test]
    async fn the_hello_tells_what_is_held_and_an_old_control_plane_turns_enforcement_off() {
        let a = allowances(WhenAway::Refuse);
        a.heard(Some(&grant("k", 1_000, false)), false);
        let in_flight = a.admit("k", 300).await.unwrap().unwrap();
        let mut hello = pb::StreamSnapshotsRequest::default();
        a.hello(&mut hello);
        assert!(hello.accepts_allowances);
        assert_eq!(hello.incarnation, "inc");
        assert_eq!(hello.held_allowances.len(), 1);
        assert_eq!(
            hello.held_allowances[0].held_nanos, 1_000,
            "pool + in flight"
        );
        drop(in_flight);
        // A snapshot first on a stream: this control plane grants nothing.
        a.heard(None, true);
        assert!(a.admit("k", 5_000).await.unwrap().is_none());
    }
}
