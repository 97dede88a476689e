//! How a caller presents a secret (`Authorization: Bearer <secret>`) and how a client key is
//! recognised without storing it (its SHA-256).

use sha2::{Digest as _, Sha256};

/// The fewest characters an admin or data-plane token may have. Both servers refuse to start
/// with a shorter one; generated tokens (64 hex digits) and `openssl rand -hex 16` or more
/// qualify. Even 32 characters of lowercase hex are 128 bits: out of reach of online
/// guessing, which the control plane also slows down.
pub const MIN_TOKEN_CHARS: usize = 32;

/// `Err(why)` when `token` is too short to be a token, or holds a character no HTTP header
/// carries (`what` names where it came from; the token is never shown). Such a token started
/// the server and then matched nothing: every header holding it is read as none.
pub fn check_token_strength(what: &str, token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(format!(
            "{what} is too short: a token needs at least {MIN_TOKEN_CHARS} characters \
             (generate one with `openssl rand -hex 32`)"
        ));
    }
    // What `HeaderValue::to_str` takes: visible ASCII, spaces and tabs.
    if !token
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(format!(
            "{what} holds a character an HTTP header cannot carry: a token must be printable \
             ASCII (generate one with `openssl rand -hex 32`)"
        ));
    }
    Ok(())
}

/// The credentials of an `Authorization` header value of the `Bearer` scheme: the scheme is
/// matched without regard to case (RFC 9110 §11.1) and the credentials are trimmed. `None`
/// when the scheme is another or the credentials are empty.
pub fn bearer_token(header: &str) -> Option<&str> {
    // The form nearly every client sends, `Bearer` and one space or tab at the very start, is
    // told by its first seven bytes: searching for the separator a character at a time and
    // trimming the whole value cost about 230 instructions more a request. The same answer as
    // the general form below for any text (test `the_usual_form_answers_as_the_general_one`).
    if let Some((scheme, token)) = header.split_at_checked(6)
        && scheme.eq_ignore_ascii_case("bearer")
        && let Some(token) = token.strip_prefix([' ', '\t'])
    {
        return Some(token.trim()).filter(|t| !t.is_empty());
    }
    bearer_token_in_general(header)
}

/// [`bearer_token`] for any value: whitespace around it and the scheme, any case.
fn bearer_token_in_general(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(token.trim()).filter(|t| !t.is_empty())
}

/// What the control plane stores and the data plane looks a client key up by: the SHA-256 of
/// its plaintext.
pub fn client_key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A token no header can carry (a passphrase with an accented letter, a control
    /// character) is refused at start, without being shown; printable ASCII with inner spaces
    /// is taken (`Bearer a b` carries it).
    #[test]
    fn a_token_no_header_can_carry_is_refused() {
        for token in [
            "Überwachungs-Passphrase-für-Sluice-2025",
            "0123456789abcdef0123456789abcdef\u{7f}",
            "0123456789abcdef\n0123456789abcdef",
        ] {
            let refused = check_token_strength("SLUICE_ADMIN_TOKEN", token).unwrap_err();
            assert!(refused.contains("SLUICE_ADMIN_TOKEN"), "{refused}");
            assert!(!refused.contains("0123") && !refused.contains("Passphrase"));
            let header = http::HeaderValue::from_str(&format!("Bearer {token}"));
            assert!(header.map_or(true, |h| h.to_str().is_err()), "{token:?}");
        }
        let taken = "correct horse battery staple 0123456789 ~!@#$%^&*()";
        assert_eq!(check_token_strength("SLUICE_ADMIN_TOKEN", taken), Ok(()));
        let header = http::HeaderValue::from_str(&format!("Bearer {taken}")).unwrap();
        assert_eq!(bearer_token(header.to_str().unwrap()), Some(taken));
    }

    #[test]
    fn bearer_scheme_any_case_credentials_trimmed() {
        for (header, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("  Bearer \t abc  ", Some("abc")),
            ("Bearer\tabc", Some("abc")),
            ("Bearer ", None),
            ("Bearer", None),
            ("", None),
            ("abc", None),
            ("Basic abc", None),
            ("Bearerabc", None),
        ] {
            assert_eq!(bearer_token(header), token, "{header:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_usual_form_answers_as_the_general_one(
            scheme in "(?i:bearer|basic|bearerx|beare)",
            separator in "[ \t\u{a0}\u{2003}]{0,3}",
            token in "[ \t\u{a0}]{0,2}[a-zA-Z0-9_\\-é]{0,12}[ \t\u{2003}]{0,2}",
            before in "[ \t\u{a0}]{0,2}",
        ) {
            for header in [
                format!("{scheme}{separator}{token}"),
                format!("{before}{scheme}{separator}{token}"),
            ] {
                proptest::prop_assert_eq!(
                    bearer_token(&header),
                    bearer_token_in_general(&header),
                    "{:?}", header
                );
            }
        }
    }

    #[test]
    fn client_key_hash_is_sha256_of_the_plaintext() {
        assert_eq!(
            client_key_hash("abc")[..4],
            [0xba, 0x78, 0x16, 0xbf],
            "SHA-256(\"abc\") begins ba7816bf"
        );
    }
}
