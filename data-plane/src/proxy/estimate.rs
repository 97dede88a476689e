//! What a request's prompt is estimated at before it is sent: what the key's budget reserves
//! and the token limits charge until the provider's usage arrives, and what a request cut
//! short is charged without it. A token per 4 bytes of body (a tokenizer is not worth its
//! cost on the request path), except for images sent inline in base64: a provider counts an
//! image by its pixels, scaled down to a bound, not by its bytes, and a screenshot's 3 MB of
//! base64 would otherwise count 800,000 tokens for what is billed about a thousand.

use memchr::memmem::Finder;
use std::sync::LazyLock;

/// What an image sent in the prompt counts: Anthropic's largest (about 1.15 megapixels,
/// larger ones are scaled down to it); OpenAI's high-detail images cost up to about 1,100 on
/// most models.
pub const IMAGE_TOKENS: u64 = 1_600;

/// Bodies shorter than this are counted at a token per 4 bytes without a look inside: a
/// 100 × 100 PNG is already about 10 KB of base64.
const LOOK_INSIDE_FROM: usize = 16 * 1024;

/// A base64 string shorter than this counts as text.
const MIN_IMAGE_BYTES: usize = 1024;

/// The prompt tokens a request body is estimated at.
pub fn prompt_tokens(body: &[u8]) -> u64 {
    if body.len() < LOOK_INSIDE_FROM {
        return body.len().div_ceil(4) as u64;
    }
    let (mut image_bytes, mut images) = (0usize, 0u64);
    for image in inline_images(body) {
        image_bytes += image.len();
        images += 1;
    }
    (body.len().saturating_sub(image_bytes)).div_ceil(4) as u64 + images * IMAGE_TOKENS
}

static DATA_URL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(";base64,"));
static DATA_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("\"data\""));

/// How far before `;base64,` a data URL's opening quote may be: `"data:image/` and a media
/// type (the longest registered image subtype is under 40 bytes).
const MAX_DATA_URL_HEAD: usize = 64;

/// The base64 of each image in `body`: in a data URL `"data:image/…;base64,…"` (OpenAI's
/// `image_url.url`, the Responses API's `image_url`), or in the value of a `data` member
/// (Anthropic's `base64` sources, whatever the order of their members); either way a string
/// of base64 only, at least [`MIN_IMAGE_BYTES`] long, beginning as a PNG, JPEG, GIF or WebP
/// file does (text written to look like one is text). Each byte of the body is read a bounded
/// number of times: a search goes on after the string it read, and looks back at most
/// [`MAX_DATA_URL_HEAD`] bytes.
fn inline_images(body: &[u8]) -> Vec<&[u8]> {
    let mut images = Vec::new();
    let mut from = 0;
    while let Some(found) = DATA_URL.find(&body[from..]) {
        let at = from + found;
        let payload_start = at + DATA_URL.needle().len();
        let value = string_to_its_end(body, payload_start);
        from = payload_start + value.len();
        let head = &body[at.saturating_sub(MAX_DATA_URL_HEAD)..at];
        let is_image_url = memchr::memrchr(b'"', head)
            .is_some_and(|quote| head[quote + 1..].starts_with(b"data:image/"));
        if is_image_url && is_image(value) {
            images.push(value);
        }
    }
    let mut from = 0;
    while let Some(found) = DATA_KEY.find(&body[from..]) {
        let after_key = from + found + DATA_KEY.needle().len();
        from = after_key;
        let rest = &body[after_key..];
        let Some(rest) = skip_whitespace(rest).strip_prefix(b":") else {
            continue;
        };
        let Some(rest) = skip_whitespace(rest).strip_prefix(b"\"") else {
            continue;
        };
        let start = body.len() - rest.len();
        let value = string_to_its_end(body, start);
        from = start + value.len();
        if is_image(value) {
            images.push(value);
        }
    }
    images
}

/// Whether a JSON string's text is an image in base64: long enough, base64 throughout (an
/// escaped `\/` allowed), and beginning with an image file's signature.
fn is_image(value: &[u8]) -> bool {
    /// The bytes of base64 text in a JSON string: the alphabet, `=`, and `\` of `\/`.
    const BASE64: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'\\');
            b += 1;
        }
        table
    };
    value.len() >= MIN_IMAGE_BYTES
        && begins_as_an_image(value)
        && value.iter().all(|&b| BASE64[usize::from(b)])
}

/// `body` from `start` to the next quote (or its end).
fn string_to_its_end(body: &[u8], start: usize) -> &[u8] {
    let rest = &body[start..];
    &rest[..memchr::memchr(b'"', rest).unwrap_or(rest.len())]
}

fn skip_whitespace(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &bytes[n..]
}

/// Whether base64 text starts with the signature of a PNG, JPEG, GIF or WebP file (a JSON
/// writer may have escaped its slashes).
fn begins_as_an_image(base64: &[u8]) -> bool {
    const PNG: &[u8] = b"iVBORw0KGgo";
    const GIF: &[u8] = b"R0lGOD";
    // RIFF, 4 bytes of size, then WEBP: "RUJQ" encodes its last three letters.
    let webp = base64.starts_with(b"UklGR") && base64.get(12..16) == Some(b"RUJQ");
    base64.starts_with(PNG)
        || base64.starts_with(GIF)
        || base64.starts_with(b"/9j/")
        || base64.starts_with(b"\\/9j\\/")
        || webp
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn base64_of(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    /// A file of `size` bytes starting with `signature`, in base64.
    fn file(signature: &[u8], size: usize) -> String {
        let mut bytes = signature.to_vec();
        bytes.resize(size, 0x5a);
        base64_of(&bytes)
    }

    fn png(size: usize) -> String {
        file(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", size)
    }

    #[test]
    fn the_signatures_are_what_the_files_encode_to() {
        assert!(begins_as_an_image(png(100).as_bytes()));
        assert!(begins_as_an_image(
            file(b"\xff\xd8\xff\xe0", 100).as_bytes()
        ));
        assert!(begins_as_an_image(file(b"GIF89a", 100).as_bytes()));
        assert!(begins_as_an_image(
            file(b"RIFF\x10\x20\x30\x00WEBPVP8 ", 100).as_bytes()
        ));
        // A WAV is RIFF too: audio is counted as text.
        assert!(!begins_as_an_image(
            file(b"RIFF\x10\x20\x30\x00WAVEfmt ", 100).as_bytes()
        ));
        assert!(!begins_as_an_image(file(b"%PDF-1.7", 100).as_bytes()));
    }

    #[test]
    fn a_short_body_counts_a_token_per_four_bytes() {
        assert_eq!(prompt_tokens(b""), 0);
        assert_eq!(prompt_tokens(&[b'x'; 4001]), 1001);
        let small_image = format!(r#"{{"url":"data:image/png;base64,{}"}}"#, png(3000));
        assert!(small_image.len() < LOOK_INSIDE_FROM);
        assert_eq!(
            prompt_tokens(small_image.as_bytes()),
            small_image.len().div_ceil(4) as u64
        );
    }

    #[test]
    fn an_openai_image_counts_as_an_image_and_the_rest_as_text() {
        let image = png(3 << 20);
        let body = serde_json::json!({
            "model": "m",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "what is in this picture?"},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image}")}},
                {"type": "image_url", "image_url": {"url": format!("data:image/jpeg;base64,{}", file(b"\xff\xd8\xff", 50_000))}},
            ]}],
        })
        .to_string();
        let text = body.len() - image.len() - file(b"\xff\xd8\xff", 50_000).len();
        assert_eq!(
            prompt_tokens(body.as_bytes()),
            text.div_ceil(4) as u64 + 2 * IMAGE_TOKENS
        );
    }

    #[test]
    fn an_anthropic_image_counts_as_an_image_in_any_member_order_and_escaping() {
        let image = png(200_000);
        for source in [
            format!(r#"{{"type":"base64","media_type":"image/png","data":"{image}"}}"#),
            format!(r#"{{"data" : "{image}", "media_type": "image/png", "type": "base64"}}"#),
        ] {
            let body = format!(
                r#"{{"model":"m","max_tokens":9,"messages":[{{"role":"user","content":[{{"type":"image","source":{source}}}]}}]}}"#
            );
            assert_eq!(
                prompt_tokens(body.as_bytes()),
                (body.len() - image.len()).div_ceil(4) as u64 + IMAGE_TOKENS,
                "{}",
                &source[..60]
            );
        }
        let jpeg = file(b"\xff\xd8\xff", 30_000).replace('/', "\\/");
        let body = format!(r#"{{"source":{{"data":"{jpeg}"}}}}"#);
        assert_eq!(
            prompt_tokens(body.as_bytes()),
            (body.len() - jpeg.len()).div_ceil(4) as u64 + IMAGE_TOKENS
        );
    }

    #[test]
    fn documents_audio_and_text_count_by_their_bytes() {
        let pdf = file(b"%PDF-1.7", 100_000);
        let wav = file(b"RIFF\x10\x20\x30\x00WAVEfmt ", 100_000);
        let text = "a long conversation ".repeat(5_000);
        for body in [
            format!(r#"{{"file_data":"data:application/pdf;base64,{pdf}"}}"#),
            format!(r#"{{"input_audio":{{"data":"{wav}","format":"wav"}}}}"#),
            format!(r#"{{"content":"{text}","data":"{text}"}}"#),
        ] {
            assert_eq!(
                prompt_tokens(body.as_bytes()),
                body.len().div_ceil(4) as u64
            );
        }
    }

    /// A string of `;base64,` markers is read once (each was read to the string's ends, and
    /// counted as an image of its own: seconds of a serving thread for a megabyte, and an
    /// estimate of 2e8 tokens charged to a backend shared by every key), and text made to
    /// look like an image is text.
    #[test]
    fn markers_repeated_in_one_string_and_text_dressed_as_an_image_count_as_text() {
        let repeated = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"data:image/png;base64,{}"}}]}}"#,
            ";base64,".repeat(131_072)
        );
        let text = "the quick brown fox ".repeat(10_000);
        let dressed = format!(
            r#"{{"content":"data:image/png;base64,iVBORw0KGgo{text}","source":{{"data":"iVBORw0KGgo{text}"}}}}"#
        );
        for body in [repeated, dressed] {
            assert!(inline_images(body.as_bytes()).is_empty());
            assert_eq!(
                prompt_tokens(body.as_bytes()),
                body.len().div_ceil(4) as u64
            );
        }
    }

    proptest::proptest! {
        /// Whatever the body: the images found are apart from one another (their bytes
        /// together at most the body's), each of at least `MIN_IMAGE_BYTES`, so the estimate
        /// is at most a token per 4 bytes plus an image's tokens per `MIN_IMAGE_BYTES`.
        #[test]
        fn images_found_never_overlap_nor_outnumber_the_bytes(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "\"data\"", ":", " ", "\"", "data:image/png;base64,", ";base64,",
                    "iVBORw0KGgo", "/9j/", "UklGR", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                ]),
                0..2_000,
            ),
        ) {
            let body = pieces.concat();
            let mut images = inline_images(body.as_bytes());
            images.sort_by_key(|i| i.as_ptr() as usize);
            let image_bytes: usize = images.iter().map(|i| i.len()).sum();
            proptest::prop_assert!(image_bytes <= body.len());
            for pair in images.windows(2) {
                let (a, b) = (pair[0].as_ptr() as usize, pair[1].as_ptr() as usize);
                proptest::prop_assert!(a + pair[0].len() <= b);
            }
            proptest::prop_assert!(images.iter().all(|i| i.len() >= MIN_IMAGE_BYTES));
            proptest::prop_assert!(
                prompt_tokens(body.as_bytes())
                    <= body.len().div_ceil(4) as u64
                        + (body.len() / MIN_IMAGE_BYTES) as u64 * IMAGE_TOKENS
            );
        }
    }
}
