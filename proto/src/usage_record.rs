//! A [`UsageRecord`] encoded by hand, byte for byte as prost encodes it.
//!
//! The data plane encodes a record for every request it serves. prost's generated encoder
//! computes the message's length field by field, then writes each field through a generic
//! buffer, one `put_u8` call (with its capacity check) per varint byte: about 1,900
//! instructions for a finished chat request's record, a twentieth of what the data plane
//! itself spends on the request. Here the fields are written in one function, in prost's
//! order (declaration order) and under prost's rules (proto3: a scalar at its default is left
//! out, a message field is written whenever it is set), twice: into a counter for the exact
//! length, then into a buffer of that length (a larger one, allocated for every record and
//! kept until the record is acknowledged, cost glibc's allocator more than the count). The
//! struct is taken apart without `..`, so a field added to the message does not compile
//! until it is written here too; the tests compare the bytes with prost's for arbitrary
//! records.

use pbjson_types::{Duration, Timestamp};

use crate::v1::UsageRecord;

/// Wire types.
const VARINT: u8 = 0;
const LENGTH_DELIMITED: u8 = 2;

impl UsageRecord {
    /// What `prost::Message::encode_to_vec` returns, sooner.
    pub fn encode_to_vec_by_hand(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len_by_hand());
        self.encode_by_hand(&mut out);
        out
    }

    /// What `prost::Message::encoded_len` returns, sooner.
    pub fn encoded_len_by_hand(&self) -> usize {
        let mut len = Count(0);
        self.write_fields(&mut len);
        len.0
    }

    /// Appends what `prost::Message::encode_raw` writes, sooner (for a record framed inside
    /// another message, as the data plane's usage spool frames each request's start).
    pub fn encode_by_hand(&self, out: &mut Vec<u8>) {
        self.write_fields(out);
    }

    #[inline(always)]
    fn write_fields(&self, out: &mut impl Sink) {
        let Self {
            sequence,
            request_id,
            backend_id,
            model,
            client_key_id,
            prompt_tokens,
            completion_tokens,
            latency,
            time_to_first_token,
            status_code,
            error_kind,
            stream,
            time,
            attempts,
            endpoint,
            cached_prompt_tokens,
            reasoning_tokens,
            cost_nanos,
            tokens_estimated,
            priced,
            cache_write_prompt_tokens,
            unbudgeted,
            budget_period_start_ms,
            audio_prompt_tokens,
            audio_completion_tokens,
        } = self;
        out.uint(1, *sequence);
        out.string(2, request_id);
        out.string(3, backend_id);
        out.string(4, model);
        out.string(5, client_key_id);
        out.uint(6, *prompt_tokens);
        out.uint(7, *completion_tokens);
        if let Some(Duration { seconds, nanos }) = latency {
            out.time(8, *seconds, *nanos);
        }
        if let Some(Duration { seconds, nanos }) = time_to_first_token {
            out.time(9, *seconds, *nanos);
        }
        out.uint(10, u64::from(*status_code));
        out.int(11, i64::from(*error_kind));
        out.uint(12, u64::from(*stream));
        if let Some(Timestamp { seconds, nanos }) = time {
            out.time(13, *seconds, *nanos);
        }
        out.uint(14, u64::from(*attempts));
        out.int(15, i64::from(*endpoint));
        out.uint(16, *cached_prompt_tokens);
        out.uint(17, *reasoning_tokens);
        out.uint(18, *cost_nanos);
        out.uint(19, u64::from(*tokens_estimated));
        out.uint(20, u64::from(*priced));
        out.uint(21, *cache_write_prompt_tokens);
        out.uint(22, u64::from(*unbudgeted));
        out.int(23, *budget_period_start_ms);
        out.uint(24, *audio_prompt_tokens);
        out.uint(25, *audio_completion_tokens);
    }
}

/// Where the fields go: a buffer, or a count of their bytes.
trait Sink {
    fn varint(&mut self, value: u64);
    fn bytes(&mut self, bytes: &[u8]);

    #[inline(always)]
    fn key(&mut self, tag: u32, wire_type: u8) {
        self.varint(u64::from(tag << 3 | u32::from(wire_type)));
    }

    /// An unsigned integer or a bool, left out at 0.
    #[inline(always)]
    fn uint(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.key(tag, VARINT);
            self.varint(value);
        }
    }

    /// A signed integer or an enum, left out at 0 (a negative one takes ten bytes, as its
    /// two's complement in 64 bits).
    #[inline(always)]
    fn int(&mut self, tag: u32, value: i64) {
        self.uint(tag, value as u64);
    }

    #[inline(always)]
    fn string(&mut self, tag: u32, value: &str) {
        if !value.is_empty() {
            self.key(tag, LENGTH_DELIMITED);
            self.varint(value.len() as u64);
            self.bytes(value.as_bytes());
        }
    }

    /// A `Duration` or a `Timestamp` (the same two fields), written even when both are 0.
    #[inline(always)]
    fn time(&mut self, tag: u32, seconds: i64, nanos: i32) {
        let mut len = Count(0);
        len.int(1, seconds);
        len.int(2, i64::from(nanos));
        self.key(tag, LENGTH_DELIMITED);
        self.varint(len.0 as u64);
        self.int(1, seconds);
        self.int(2, i64::from(nanos));
    }
}

impl Sink for Vec<u8> {
    #[inline(always)]
    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.push(value as u8);
    }

    #[inline(always)]
    fn bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct Count(usize);

impl Sink for Count {
    #[inline(always)]
    fn varint(&mut self, value: u64) {
        self.0 += varint_len(value);
    }

    #[inline(always)]
    fn bytes(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

#[inline(always)]
fn varint_len(value: u64) -> usize {
    // Seven bits a byte; 0 takes one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;
    use prost::Message as _;

    fn time() -> impl Strategy<Value = Option<(i64, i32)>> {
        prop_oneof![
            Just(None),
            Just(Some((0, 0))),
            (any::<i64>(), any::<i32>()).prop_map(Some),
            (0..100_000i64, 0..1_000_000_000i32).prop_map(Some),
        ]
    }

    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0), 1..200u64, any::<u64>()]
    }

    prop_compose! {
        fn record()(
            sequence in number(),
            strings in proptest::collection::vec(prop_oneof![Just(String::new()), ".{1,40}", ".{120,140}"], 4),
            counts in proptest::collection::vec(number(), 8),
            small in proptest::collection::vec(prop_oneof![Just(0u32), 1..600u32, any::<u32>()], 2),
            enums in proptest::collection::vec(prop_oneof![Just(0i32), 1..12i32, any::<i32>()], 2),
            flags in any::<(bool, bool, bool, bool)>(),
            times in proptest::collection::vec(time(), 3),
            period in prop_oneof![Just(0i64), 1_700_000_000_000..1_900_000_000_000i64, any::<i64>()],
        ) -> UsageRecord {
            let duration = |t: Option<(i64, i32)>| t.map(|(seconds, nanos)| Duration { seconds, nanos });
            UsageRecord {
                sequence,
                request_id: strings[0].clone(),
                backend_id: strings[1].clone(),
                model: strings[2].clone(),
                client_key_id: strings[3].clone(),
                prompt_tokens: counts[0],
                completion_tokens: counts[1],
                latency: duration(times[0]),
                time_to_first_token: duration(times[1]),
                status_code: small[0],
                error_kind: enums[0],
                stream: flags.0,
                time: times[2].map(|(seconds, nanos)| Timestamp { seconds, nanos }),
                attempts: small[1],
                endpoint: enums[1],
                cached_prompt_tokens: counts[2],
                reasoning_tokens: counts[3],
                cost_nanos: counts[4],
                tokens_estimated: flags.1,
                priced: flags.2,
                cache_write_prompt_tokens: counts[5],
                unbudgeted: flags.3,
                budget_period_start_ms: period,
                audio_prompt_tokens: counts[6],
                audio_completion_tokens: counts[7],
            }
        }
    }

    proptest! {
        #[test]
        fn a_record_by_hand_is_the_bytes_prost_writes(record in record()) {
            prop_assert_eq!(record.encode_to_vec_by_hand(), record.encode_to_vec());
            prop_assert_eq!(record.encoded_len_by_hand(), record.encoded_len());
            let mut appended = vec![7];
            record.encode_by_hand(&mut appended);
            let mut by_prost = vec![7];
            record.encode_raw(&mut by_prost);
            prop_assert_eq!(appended, by_prost);
        }
    }

    #[test]
    fn the_empty_record_and_a_typical_one_are_the_bytes_prost_writes() {
        let empty = UsageRecord::default();
        assert_eq!(empty.encode_to_vec_by_hand(), empty.encode_to_vec());
        let typical = UsageRecord {
            sequence: 1_234,
            request_id: "019ae0c4-6f3a-7cc1-9b52-0d3c1f6a2b7e".into(),
            backend_id: "be-1".into(),
            model: "gpt-4o-mini".into(),
            client_key_id: "key-1".into(),
            prompt_tokens: 12,
            completion_tokens: 345,
            latency: Some(Duration {
                seconds: 0,
                nanos: 1_234_567,
            }),
            time_to_first_token: Some(Duration::default()),
            status_code: 200,
            attempts: 1,
            endpoint: 1,
            time: Some(Timestamp {
                seconds: 1_780_000_000,
                nanos: 999_999_999,
            }),
            cost_nanos: 17_000,
            priced: true,
            ..UsageRecord::default()
        };
        assert_eq!(typical.encode_to_vec_by_hand(), typical.encode_to_vec());
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            assert_eq!(
                varint_len(value),
                prost::encoding::encoded_len_varint(value)
            );
        }
    }
}
