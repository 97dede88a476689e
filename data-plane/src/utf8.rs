//! The UTF-8 check of what the hot path reads as text: a client's request body, an upstream's
//! whole answer, each line of its stream.

/// `bytes` as text, when they are UTF-8: the answer of [`std::str::from_utf8`] (test
/// `the_check_answers_as_std`), found by `simdutf8`, which looks at 64 bytes a step with the
/// vector instructions the CPU has (picked once, at the first call) where std looks at a word.
pub fn text(bytes: &[u8]) -> Option<&str> {
    simdutf8::basic::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_check_answers_as_std(
            bytes in prop::collection::vec(any::<u8>(), 0..300),
            text in ".{0,200}",
            cut in any::<prop::sample::Index>(),
        ) {
            prop_assert_eq!(super::text(&bytes), std::str::from_utf8(&bytes).ok());
            prop_assert_eq!(super::text(text.as_bytes()), Some(text.as_str()));
            // Cut anywhere, a multi-byte character's first bytes at the end included.
            let cut = &text.as_bytes()[..cut.index(text.len() + 1)];
            prop_assert_eq!(super::text(cut), std::str::from_utf8(cut).ok());
        }
    }
}
