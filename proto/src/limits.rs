//! Bounds both ends of the Sluice API agree on: the largest gRPC message each RPC carries, and
//! the longest client-supplied value that may reach a usage record, a metric label, a log
//! line or a snapshot. Each is defined here once; the control plane, the data plane and
//! `sluicectl` all set their limits from these constants (see `docs/guarantees.md`).
//!
//! The supported configuration these are sized for: 100,000 client keys and 1,000 backends
//! with 10 model routes each (two price tiers each). With every name at its 64-character limit
//! its snapshot encodes to 29.4 MiB (every backend cooling down) and `ListClientKeys` to
//! 25.9 MiB (`proto/tests/limits.rs`), so both limits leave more than twice that room; with
//! every model of every backend cooling down too, the snapshot is 33.5 MiB (1.9 times the
//! room).

/// Largest `StreamSnapshotsResponse` the control plane sends and a data plane decodes. An
/// admin write that would make the snapshot larger is refused.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// Largest `ReportUsageRequest` a data plane sends and the control plane decodes. Data
/// planes split their batches to stay under it.
pub const MAX_USAGE_REPORT_BYTES: usize = 4 * 1024 * 1024;

/// What a data plane keeps each `StreamSnapshotsRequest` (a hello, an ack, a nack, its asks
/// for allowances) under: a hello names at most 800 held allowances, a message at most 512
/// asks. The control plane decodes them up to [`MAX_USAGE_REPORT_BYTES`], the one decoding
/// limit of its data-plane service (a client key's id is at most [`MAX_ID_BYTES`], which a
/// message of 512 asks could pass this by).
pub const MAX_SNAPSHOT_ACK_BYTES: usize = 64 * 1024;

/// Largest request of `AdminService` and `StatsService` the control plane decodes (and
/// `sluicectl` sends).
pub const MAX_ADMIN_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Largest response of `AdminService` and `StatsService` the control plane sends (and
/// `sluicectl` decodes).
pub const MAX_ADMIN_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Most buckets one `GetUsage` page holds (a larger `page_size` is taken as this). With
/// every group key and label at its longest such a page encodes to under
/// [`DEFAULT_CLIENT_DECODE_BYTES`] (`proto/tests/limits.rs`), so any gRPC client reads it
/// with its default limit.
pub const MAX_USAGE_PAGE_SIZE: usize = 5000;

/// The most client keys one page of `ListClientKeys` holds: at the supported size of a key
/// (its name, allow-list and limits, `proto/tests/limits.rs`) such a page encodes to well under
/// [`DEFAULT_CLIENT_DECODE_BYTES`], and its keys' spends are summed in tens of milliseconds.
pub const MAX_KEY_PAGE_SIZE: usize = 1000;

/// The largest message gRPC clients (tonic, grpc-go, grpcio, grpc-js) decode unless told
/// otherwise: what a client that sets no limit of its own can read.
pub const DEFAULT_CLIENT_DECODE_BYTES: usize = 4 * 1024 * 1024;

/// Longest public or upstream model name, in bytes. A route's names are refused beyond it;
/// a usage record never carries a longer one (a request for a model no route serves is
/// recorded as [`OTHER_MODEL`]).
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// The most price tiers a model route lists (`ModelRoute.tier_multipliers`), and the longest
/// name of one: the words providers report (`priority`, `ultrafast`, `us`) with room to spare.
pub const MAX_PRICE_TIERS: usize = 8;
pub const MAX_TIER_NAME_BYTES: usize = 32;

/// The most priced tools a model route lists (`ModelRoute.call_prices`); a tool's name is
/// as long as a tier's at most.
pub const MAX_CALL_PRICES: usize = 8;

/// Longest `x-request-id` a data plane keeps from a client (1 to 128 of
/// `[A-Za-z0-9._:-]`); any other gets a fresh UUIDv7.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Longest id in a `DataPlaneService` message: node id, incarnation, backend id, client key
/// id.
pub const MAX_ID_BYTES: usize = 256;

/// What usage records and metric labels say for a requested model that no route serves:
/// the name a client sent is not kept, so clients cannot invent unbounded values.
pub const OTHER_MODEL: &str = "other";

/// The shortest and the longest allowance lease a replica may hold (`--allowance-lease`): the
/// control plane counts a replica's grants as held for at most the longest (and 5 s more)
/// after its stream closed, then grants that money again; a replica that spent it for longer
/// would spend it twice.
pub const ALLOWANCE_LEASE: std::ops::RangeInclusive<std::time::Duration> =
    std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(3_600);
