//! The codec every generated client and server uses (`codec_path` in `build.rs`): prost's
//! encoder as it is, and prost's decoder reading the message from one contiguous slice.
//!
//! tonic hands a decoder the message as a `DecodeBuf` over its receive buffer (a
//! `BytesMut`), and prost, generic over `Buf`, advances that buffer after every field: each
//! advance goes through `BytesMut`'s bookkeeping. The message is always whole and
//! contiguous in that buffer by then, so decoding its bytes as a `&[u8]` and advancing once
//! gives the same message (the same errors: prost's) for far fewer instructions; the control
//! plane decodes tens of thousands of usage records a second (docs/benchmarks.md, "The
//! control plane's ingest").
//!
//! A message that does not decode is answered by what it is ([`Side`]): a request, which
//! only a server decodes, is the client's mistake (`INVALID_ARGUMENT`, as the JSON API
//! answers the same mistake); an answer, which only a client decodes, is the server's
//! (`INTERNAL`, tonic's choice).

use std::marker::PhantomData;

use prost::Message;
use prost::bytes::Buf;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// prost's codec, decoding from a slice (see the module's documentation).
#[derive(Debug, Clone)]
pub struct SliceCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SliceCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

/// Which side of a method a message is, for the status of one that does not decode
/// (implemented by `build.rs` for every message a method takes or returns).
pub trait Side {
    /// Whether the message is a method's request (decoded by servers), not its answer.
    const REQUEST: bool;
}

impl<T, U> Codec for SliceCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Side + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = SliceDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        SliceDecoder(PhantomData)
    }
}

/// Decodes a `U` from the bytes of its message.
#[derive(Debug, Clone)]
pub struct SliceDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Side> Decoder for SliceDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        let chunk = buf.chunk();
        let decoded = if chunk.len() == len {
            let decoded = U::decode(chunk);
            buf.advance(len);
            decoded
        } else {
            // Not one slice (tonic does not do this today): prost's own way.
            U::decode(buf)
        };
        decoded.map(Some).map_err(|e| {
            if U::REQUEST {
                Status::invalid_argument(format!("request: {e}"))
            } else {
                Status::internal(e.to_string())
            }
        })
    }
}
