//! Paged listings: a `page_token` names the request it continues (a hash of every field
//! but the page's own) and where the page before ended (an order key: a time and an id),
//! so a token is refused with any other request and a listing resumes exactly after the
//! last item it answered, whatever was added or removed meanwhile.

use base64::Engine as _;
use sha2::Digest as _;
use sluice_proto::v1 as pb;
use tonic::Status;

use crate::store::Cursor;

/// What a `page_token` holds: which query it belongs to (a hash of every field but the
/// token and the page size) and the order key of the last item of the page before (a usage
/// page's time bucket and group; a key page's creation time and id).
#[derive(serde::Serialize, serde::Deserialize)]
struct PageToken {
    query: String,
    start_ms: i64,
    group_key: String,
}

/// A request answered in pages: its token, and the request without its page fields.
pub(super) trait Paged: prost::Message + Sized {
    fn page_token(&self) -> &str;
    fn without_page(&self) -> Self;
}

/// These requests page the same way: `page_size` and `page_token` beside the query's fields.
macro_rules! paged {
    ($($request:ty),*) => {$(
        impl Paged for $request {
            fn page_token(&self) -> &str {
                &self.page_token
            }

            fn without_page(&self) -> Self {
                Self {
                    page_size: 0,
                    page_token: String::new(),
                    ..self.clone()
                }
            }
        }
    )*};
}

paged!(
    pb::GetUsageRequest,
    pb::GetTotalsRequest,
    pb::ListClientKeysRequest
);

fn query_hash(r: &impl Paged) -> String {
    let query = r.without_page();
    hex::encode(&sha2::Sha256::digest(query.encode_to_vec())[..12])
}

pub(super) fn encode_token(r: &impl Paged, cursor: Cursor) -> String {
    let token = PageToken {
        query: query_hash(r),
        start_ms: cursor.start_ms,
        group_key: cursor.group_key,
    };
    // Serialising a struct of strings and an integer cannot fail.
    let json = serde_json::to_vec(&token).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

pub(super) fn decode_token(r: &impl Paged) -> Result<Option<Cursor>, Status> {
    if r.page_token().is_empty() {
        return Ok(None);
    }
    let refused = || {
        Status::invalid_argument(
            "page_token: not a token of this query (pass next_page_token with the same fields)",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(r.page_token())
        .map_err(|_| refused())?;
    let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| refused())?;
    if token.query != query_hash(r) {
        return Err(refused());
    }
    Ok(Some(Cursor {
        start_ms: token.start_ms,
        group_key: token.group_key,
    }))
}

/// A request's `page_size`, at most `max`; refused when negative.
pub(super) fn page_size(page_size: i32, max: usize) -> Result<usize, Status> {
    Ok(usize::try_from(page_size)
        .map_err(|_| Status::invalid_argument("page_size: must not be negative"))?
        .min(max))
}
