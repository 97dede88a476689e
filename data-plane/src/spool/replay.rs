//! Reading what an earlier run of this replica left in the spool: the finished records it
//! had not seen acked, under their own sequences, and a record for each request whose
//! upstream call had started and that never finished (the process died first).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use sluice_proto::v1::{ErrorKind, UsageRecord};

use super::entry::{self, Kind};
use super::frame::Stop;

/// What one earlier incarnation left, ready to be sent again.
#[derive(Debug, Default)]
pub struct Replay {
    /// The directory holding its segments; deleted once everything is acked.
    pub dir: PathBuf,
    pub node_id: String,
    pub incarnation: String,
    /// Finished requests, by sequence.
    pub finished: Vec<UsageRecord>,
    /// Requests interrupted by the end of the process: the record of their last start,
    /// with error kind `DATA_PLANE_CRASHED`, status 0 and no latency, numbered 1, 2, … in the
    /// order they started (lane by lane), for [`Replay::interrupted_incarnation`]. Their start
    /// carries what they are charged: the prompt's estimate and its cost (none from a replica
    /// older than that, whose starts carry no tokens).
    pub interrupted: Vec<UsageRecord>,
    /// Frames dropped because they were torn or damaged.
    pub torn: u64,
    /// Bytes its segments hold on disk, after cutting off what was torn.
    pub bytes: u64,
}

impl Replay {
    /// The incarnation the interrupted requests are reported under: their numbers are not
    /// the process's own sequences, so they get a sequence space of their own.
    pub fn interrupted_incarnation(&self) -> String {
        format!("{}{}", self.incarnation, super::INTERRUPTED_SUFFIX)
    }

    /// Records to send.
    pub fn len(&self) -> usize {
        self.finished.len() + self.interrupted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads the segments in `dir` (one incarnation), oldest first per lane. A segment whose
/// last frame is torn is cut back to its last whole frame on disk, so that every later reading
/// sees the same records (a replay that is itself interrupted is repeated identically: the
/// control plane's high-water marks then skip what it already applied). Every segment is
/// flushed to disk before this returns, so nothing sent from it can vanish in a machine crash.
pub fn read(dir: &Path) -> io::Result<Replay> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let parsed = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(super::parse_segment_name);
        match parsed {
            Some(key) => segments.push((key, path)),
            // An acked segment kept for reuse, or one a crash caught being reused: nothing
            // in it is owed.
            None if path.extension().is_some_and(|e| e == "spare") => {}
            None => {
                tracing::warn!(path = %path.display(), "ignoring a file that is not a spool segment")
            }
        }
    }
    segments.sort();

    let mut replay = Replay {
        dir: dir.to_owned(),
        incarnation: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Replay::default()
    };
    // (lane, request) → the record of its latest start.
    let mut starts: BTreeMap<(u32, u64), UsageRecord> = BTreeMap::new();
    let mut finished: BTreeMap<u64, UsageRecord> = BTreeMap::new();
    let mut ended: BTreeSet<(u32, u64)> = BTreeSet::new();
    for &((lane, number), ref path) in &segments {
        let bytes = std::fs::read(path)?;
        let entry::SegmentFrames {
            frames,
            reused_file,
            named,
        } = entry::decode_segment(&bytes);
        if let Some(named) = named
            && named != (lane, number)
        {
            // A spare renamed to this segment whose new header never reached the disk (a
            // machine crash between the rename and the next flush: the rename can be on disk
            // before the header written over the file's start). What it holds is the earlier,
            // acked segment's, whose starts would come back as requests interrupted a second
            // time. Nothing of this segment was flushed, so nothing of it was sent either.
            tracing::warn!(
                path = %path.display(),
                header_lane = named.0,
                header_segment = named.1,
                "usage spool segment holds an earlier segment's records (its header was lost in a crash): ignored"
            );
            OpenOptions::new().write(true).open(path)?.set_len(0)?;
            continue;
        }
        if reused_file && frames.stop.is_some() {
            // Where the frames of the file's earlier segment begin (or a write torn there).
            tracing::debug!(path = %path.display(), kept_bytes = frames.valid_len, "usage spool segment read up to the end of its own frames");
        } else if let Some(stop) = frames.stop {
            replay.torn += 1;
            tracing::warn!(
                path = %path.display(),
                kept_bytes = frames.valid_len,
                dropped_bytes = bytes.len() - frames.valid_len,
                torn = matches!(stop, Stop::Torn),
                "usage spool segment ends in a torn or damaged record: dropped it and everything after it"
            );
        }
        let file = OpenOptions::new().write(true).open(path)?;
        if frames.stop.is_some() {
            file.set_len(frames.valid_len as u64)?;
        }
        file.sync_all()?;
        replay.bytes += frames.valid_len as u64;
        for payload in frames.payloads {
            let entry = match entry::decode(payload) {
                Ok(entry) => entry,
                Err(err) => {
                    // Whole and checksummed, yet not an entry: written by a format this build
                    // does not know. Skip it, keep the rest.
                    replay.torn += 1;
                    tracing::warn!(path = %path.display(), error = %err, "skipping a spool entry this build cannot read");
                    continue;
                }
            };
            match entry.kind {
                Some(Kind::Header(header)) if replay.node_id.is_empty() => {
                    replay.node_id = header.node_id;
                    replay.incarnation = header.incarnation;
                }
                Some(Kind::Header(_)) => {}
                Some(Kind::Start(mark)) => {
                    if let Some(record) = mark.record {
                        starts.insert((lane, mark.request), record);
                    }
                }
                Some(Kind::Finish(mark)) => {
                    if mark.request != 0 {
                        ended.insert((lane, mark.request));
                    }
                    if let Some(record) = mark.record.filter(|r| r.sequence > 0) {
                        finished.insert(record.sequence, record);
                    }
                }
                None => {}
            }
        }
    }
    replay.finished = finished.into_values().collect();
    replay.interrupted = starts
        .into_iter()
        .filter(|(key, _)| !ended.contains(key))
        .zip(1..)
        .map(|((_, record), sequence)| interrupted(record, sequence))
        .collect();
    Ok(replay)
}

/// The record of a request interrupted by the end of its process, from its last start: the
/// prompt's estimate and the cost the start carries ([`crate::proxy`]'s accounting writes
/// them there), nothing generated.
fn interrupted(mut record: UsageRecord, sequence: u64) -> UsageRecord {
    record.sequence = sequence;
    record.status_code = 0;
    record.error_kind = ErrorKind::DataPlaneCrashed as i32;
    record.completion_tokens = 0;
    record.reasoning_tokens = 0;
    record.audio_completion_tokens = 0;
    record.latency = None;
    record.time_to_first_token = None;
    record
}
