//! URL normalisation, relative URLs, cache keys and safe file names.
//!
//! URLs are hostile input. Nothing derived from a URL becomes a path component except the
//! sanitised file name, which can hold no separator, no `..` and no control character, and
//! whose length is bounded. The entry directory is the hex SHA-256 of the normalised URL.

use std::fmt;

use percent_encoding::percent_decode_str;
use sha2::{Digest, Sha256};
use url::Url;

use crate::error::{Error, ErrorKind, Result};

/// Longest file name kept, in bytes (file systems allow 255).
const MAX_NAME_BYTES: usize = 120;
/// Longest suffix (from the first dot) that survives truncation, so `.nii.gz` is kept.
const MAX_SUFFIX_BYTES: usize = 24;
/// Name used when the URL's last segment is empty or unusable.
const FALLBACK_NAME: &str = "download";
/// Name of an entry's metadata file, beside its data file: no URL's file name may take it.
pub(crate) const META_FILE: &str = "meta.json";

/// A URL resolved and checked, with everything the cache derives from it.
#[derive(Clone)]
pub(crate) struct Resolved {
    /// The URL to request: may carry credentials, so it is never logged or stored.
    pub(crate) request: Url,
    /// The normalised URL without credentials or fragment: logged, stored in meta.json.
    pub(crate) display: String,
    /// Hex SHA-256 of `display`.
    pub(crate) key: Key,
    /// Sanitised last path segment.
    pub(crate) file_name: String,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("url", &self.display)
            .field("key", &self.key)
            .finish()
    }
}

/// A cache key: 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Key(String);

impl Key {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Accepts a directory name found on disk if it is a well-formed key.
    pub(crate) fn parse(s: &str) -> Option<Key> {
        (s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Key(s.to_owned()))
    }

    /// The two-character fan-out directory.
    pub(crate) fn prefix(&self) -> &str {
        &self.0[..2]
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0[..12])
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The query parameters that sign a URL rather than name a file: left out of the cache key (so
/// that a URL signed again hits the same entry) and shown as `REDACTED`. AWS signature versions
/// 4 and 2, CloudFront, Google Cloud Storage and Azure shared access signatures.
pub const DEFAULT_IGNORED_QUERY_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-Signature",
    "X-Amz-SignedHeaders",
    "X-Amz-Security-Token",
    "AWSAccessKeyId",
    "Signature",
    "Expires",
    "Policy",
    "Key-Pair-Id",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-Signature",
    "X-Goog-SignedHeaders",
    "sig",
    "se",
    "st",
];

/// What stands in for the value of an ignored query parameter wherever a URL is shown.
const REDACTED: &str = "REDACTED";

/// How URLs are shown and keyed: which query parameters are ignored (compared without case).
#[derive(Debug, Clone)]
pub(crate) struct UrlPolicy {
    ignored: Vec<String>,
}

impl Default for UrlPolicy {
    fn default() -> Self {
        UrlPolicy::ignoring(DEFAULT_IGNORED_QUERY_PARAMS.iter().copied())
    }
}

impl UrlPolicy {
    pub(crate) fn ignoring<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> UrlPolicy {
        UrlPolicy {
            ignored: names
                .into_iter()
                .map(|n| n.as_ref().trim().to_ascii_lowercase())
                .filter(|n| !n.is_empty())
                .collect(),
        }
    }

    fn is_ignored(&self, raw_name: &str) -> bool {
        let name = percent_decode_str(raw_name).decode_utf8_lossy();
        self.ignored.iter().any(|n| name.eq_ignore_ascii_case(n))
    }

    /// The query with ignored parameters dropped (`None`) or their values redacted (`Some`);
    /// untouched, byte for byte, when none is present.
    fn rewrite_query(&self, url: &mut Url, replacement: Option<&str>) {
        let Some(query) = url.query() else { return };
        if !query
            .split('&')
            .any(|pair| self.is_ignored(pair.split('=').next().unwrap_or("")))
        {
            return;
        }
        let kept: Vec<String> = query
            .split('&')
            .filter_map(|pair| {
                let name = pair.split('=').next().unwrap_or("");
                match (self.is_ignored(name), replacement) {
                    (false, _) => Some(pair.to_owned()),
                    (true, Some(r)) => Some(format!("{name}={r}")),
                    (true, None) => None,
                }
            })
            .collect();
        url.set_query((!kept.is_empty()).then(|| kept.join("&")).as_deref());
    }

    /// The URL as it may be shown: without credentials or fragment, signing values redacted.
    pub(crate) fn display(&self, url: &Url) -> String {
        let mut url = without_credentials(url);
        self.rewrite_query(&mut url, Some(REDACTED));
        url.into()
    }

    /// The text of the URL the key is the digest of: as shown, but with the ignored
    /// parameters left out.
    fn key_text(&self, url: &Url) -> String {
        let mut url = without_credentials(url);
        self.rewrite_query(&mut url, None);
        url.into()
    }

    /// Text a caller gave, fit to print: a URL shown as [`display`](Self::display) does,
    /// anything else with what looks like user-info removed.
    pub(crate) fn redact_text(&self, input: &str) -> String {
        match Url::parse(input.trim()) {
            Ok(url) => self.display(&url),
            Err(_) => self.redact_raw(input),
        }
    }

    /// Best-effort redaction of text that did not parse as a URL: user-info removed, and
    /// the values of ignored query parameters redacted.
    fn redact_raw(&self, input: &str) -> String {
        let shown = redact_raw(input);
        let Some((head, query)) = shown.split_once('?') else {
            return shown;
        };
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| {
                let name = pair.split('=').next().unwrap_or("");
                if self.is_ignored(name) {
                    format!("{name}={REDACTED}")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        format!("{head}?{}", pairs.join("&"))
    }
}

/// Resolves `input` (absolute, or relative to `base`) and derives key and file name, with the
/// default [`UrlPolicy`].
#[cfg(test)]
pub(crate) fn resolve(input: &str, base: Option<&Url>) -> Result<Resolved> {
    resolve_with(input, base, &UrlPolicy::default())
}

/// [`resolve`] with the cache's [`UrlPolicy`].
pub(crate) fn resolve_with(
    input: &str,
    base: Option<&Url>,
    policy: &UrlPolicy,
) -> Result<Resolved> {
    let input = input.trim();
    let invalid = |msg: &str| Error::new(ErrorKind::InvalidUrl, msg.to_owned());
    if input.is_empty() {
        return Err(invalid("empty URL"));
    }
    let mut url = match Url::parse(input) {
        Ok(url) => url,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            let Some(base) = base else {
                return Err(invalid(
                    "relative URL but no image server is configured (IMAGE_SERVER)",
                ));
            };
            let joined = base
                .join(input)
                .map_err(|e| invalid("cannot join the URL to the image server").with_source(e))?;
            if joined.origin() != base.origin() || !joined.path().starts_with(base.path()) {
                return Err(invalid("relative URL escapes the image server's path"));
            }
            joined
        }
        Err(e) => {
            return Err(invalid("cannot parse")
                .with_source(e)
                .with_url(policy.redact_raw(input)));
        }
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err(
            invalid("only http and https URLs can be cached").with_url(policy.display(&url))
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("URL has no host"));
    }
    url.set_fragment(None);
    let display = policy.display(&url);
    let key = Key(hex::encode(Sha256::digest(
        policy.key_text(&url).as_bytes(),
    )));
    let file_name = file_name_of(&url);
    Ok(Resolved {
        request: url,
        display,
        key,
        file_name,
    })
}

/// The URL of `path` below `base`, joined as a path and never parsed as a URL of its own: a
/// `path` such as `http:host/x`, `//host/x` or `file:x` stays a run of path segments on the
/// image server. `path` is raw (its percent-escapes are kept); `query` is appended as given.
///
/// # Errors
/// [`ErrorKind::InvalidUrl`] when the joined path does not stay below `base`'s path (dot
/// segments, however encoded).
#[cfg(feature = "server")]
pub(crate) fn below(base: &Url, path: &str, query: Option<&str>) -> Result<Url> {
    let mut url = base.clone();
    url.set_path(&format!("{}{}", base.path(), path.trim_start_matches('/')));
    url.set_query(query);
    if url.origin() != base.origin() || !url.path().starts_with(base.path()) {
        return Err(Error::new(
            ErrorKind::InvalidUrl,
            "the path escapes the image server's path",
        ));
    }
    Ok(url)
}

/// Normalises an image server URL so that relative URLs resolve below its path.
pub(crate) fn normalise_base(server: &str) -> Result<Url> {
    let mut url = Url::parse(server.trim()).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            "IMAGE_SERVER is not a valid absolute URL",
        )
        .with_source(e)
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::new(
            ErrorKind::Config,
            "IMAGE_SERVER must be an http or https URL",
        ));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// The URL without user name, password or fragment.
fn without_credentials(url: &Url) -> Url {
    let mut url = url.clone();
    // Both calls fail only for URLs that cannot have credentials, which then have none.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_fragment(None);
    url
}

/// Best-effort redaction of text that did not parse as a URL.
fn redact_raw(input: &str) -> String {
    let (scheme, rest) = input.split_once("://").unwrap_or(("", input));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let shown = match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => input.to_owned(),
    };
    shown.chars().take(200).collect()
}

/// The sanitised last path segment of `url`.
fn file_name_of(url: &Url) -> String {
    let last = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or("");
    sanitise(&percent_decode_str(last).decode_utf8_lossy())
}

/// Makes `raw` safe as one path component that keeps its extension. Idempotent, as recovery
/// requires (it refuses a recorded name that sanitising would change): cutting a long name
/// can leave a trailing dot or space, so the rules apply until nothing changes.
pub(crate) fn sanitise(raw: &str) -> String {
    let mut name = sanitise_once(raw);
    loop {
        let again = sanitise_once(&name);
        if again == name {
            return name;
        }
        name = again;
    }
}

fn sanitise_once(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '\0' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| c == '.' || c.is_whitespace());
    // "meta.json" is the entry's own metadata; a download may not take its name.
    if trimmed.is_empty() || trimmed == META_FILE {
        return match trimmed {
            "" => FALLBACK_NAME.to_owned(),
            other => format!("_{other}"),
        };
    }
    // A name that was all dots (`..`) is empty after trimming and took the fallback above.
    truncate_keeping_suffix(trimmed)
}

fn truncate_keeping_suffix(name: &str) -> String {
    if name.len() <= MAX_NAME_BYTES {
        return name.to_owned();
    }
    // The suffix starts at the first dot after the first character that leaves at most
    // MAX_SUFFIX_BYTES (so `.nii.gz` is kept, however many dots the name has before it).
    let suffix = name
        .char_indices()
        .skip(1)
        .filter(|(_, c)| *c == '.')
        .map(|(i, _)| i)
        .find(|i| name.len() - i <= MAX_SUFFIX_BYTES)
        .map_or("", |i| &name[i..]);
    let mut stem_end = MAX_NAME_BYTES - suffix.len();
    while !name.is_char_boundary(stem_end) {
        stem_end -= 1;
    }
    format!("{}{}", &name[..stem_end], suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        normalise_base("http://images.example:8080/data").unwrap()
    }

    #[test]
    fn normalisation_makes_equivalent_urls_one_key() {
        let a = resolve("HTTP://Images.Example:80/ct/0042.nii.gz#frag", None).unwrap();
        let b = resolve("http://images.example/ct/0042.nii.gz", None).unwrap();
        let c = resolve("http://user:secret@images.example/ct/0042.nii.gz", None).unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(b.key, c.key);
        assert_eq!(a.display, "http://images.example/ct/0042.nii.gz");
        assert_eq!(a.file_name, "0042.nii.gz");
        assert_eq!(a.key.as_str().len(), 64);
        let d = resolve("http://images.example/ct/0042.nii.gz?v=2", None).unwrap();
        assert_ne!(d.key, b.key, "the query selects a different resource");
    }

    #[test]
    fn credentials_are_kept_for_the_request_but_never_displayed() {
        let r = resolve("https://alice:pw@host/a.nii.gz", None).unwrap();
        assert_eq!(r.request.username(), "alice");
        assert_eq!(r.request.password(), Some("pw"));
        assert!(!r.display.contains("alice") && !r.display.contains("pw"));
        assert!(!format!("{r:?}").contains("pw"));
        let err = resolve("ftp://alice:pw@host/a", None).unwrap_err();
        assert!(!err.to_string().contains("pw"), "{err}");
        assert_eq!(redact_raw("http://u:p@[bad/x"), "http://[bad/x");
    }

    #[test]
    fn signing_parameters_leave_the_key_and_are_redacted() {
        let a = resolve(
            "https://b.s3.example/ct/1.nii.gz?X-Amz-Date=20261202&x-amz-signature=abc&v=2",
            None,
        )
        .unwrap();
        let b = resolve(
            "https://b.s3.example/ct/1.nii.gz?v=2&X-Amz-Signature=def&X-Amz-Date=20261203",
            None,
        )
        .unwrap();
        let plain = resolve("https://b.s3.example/ct/1.nii.gz?v=2", None).unwrap();
        assert_eq!(a.key, b.key, "signed again: the same entry");
        assert_eq!(a.key, plain.key, "and the same as the unsigned URL");
        assert_eq!(
            a.display,
            "https://b.s3.example/ct/1.nii.gz?X-Amz-Date=REDACTED&x-amz-signature=REDACTED&v=2"
        );
        assert!(
            a.request.as_str().contains("x-amz-signature=abc"),
            "sent as given"
        );
        // The display form resolves to the same key (the dashboard sends it back).
        assert_eq!(resolve(&a.display, None).unwrap().key, a.key);
        // A query without ignored parameters is kept byte for byte, so keys made before this
        // policy existed still match.
        let odd = "http://h/x.nii.gz?a=%7e&b&c=1+2";
        let r = resolve(odd, None).unwrap();
        assert_eq!(r.display, odd);
        assert_eq!(r.key.as_str(), hex::encode(Sha256::digest(odd.as_bytes())));
        // Only the signature dropped: no dangling `?`.
        let only = resolve("http://h/x.nii.gz?Signature=s", None).unwrap();
        assert_eq!(only.key, resolve("http://h/x.nii.gz", None).unwrap().key);
        // A policy with no ignored parameter keys the whole query.
        let none = UrlPolicy::ignoring(Vec::<String>::new());
        let c = resolve_with("http://h/x?Signature=1", None, &none).unwrap();
        let d = resolve_with("http://h/x?Signature=2", None, &none).unwrap();
        assert_ne!(c.key, d.key);
        assert_eq!(
            UrlPolicy::default().redact_text("http://alice:pw@h/x?sig=1"),
            "http://h/x?sig=REDACTED"
        );
        assert_eq!(
            UrlPolicy::default().redact_text("http://alice:pw@[bad/x"),
            "http://[bad/x"
        );
        // Text that is no URL still loses its signature.
        assert_eq!(
            UrlPolicy::default().redact_text("https://u:p@h:99999/x?a=1&X-Amz-Signature=abc"),
            "https://h:99999/x?a=1&X-Amz-Signature=REDACTED"
        );
        let err = resolve("https://u:p@h:99999/x?Signature=abc", None).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("abc"), "{err:?}");
    }

    #[test]
    fn relative_urls_resolve_below_the_image_server() {
        let r = resolve("ct/0042.nii.gz", Some(&base())).unwrap();
        assert_eq!(r.display, "http://images.example:8080/data/ct/0042.nii.gz");
        for hostile in [
            "../secret.nii.gz",
            "/etc/passwd",
            "ct/../../x.nii.gz",
            "%2e%2e/x.nii.gz",
            "//evil.example/x.nii.gz",
        ] {
            let err = resolve(hostile, Some(&base())).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{hostile}");
        }
        let err = resolve("ct/0042.nii.gz", None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidUrl);
    }

    #[test]
    fn bad_schemes_and_garbage_are_invalid() {
        for bad in [
            "",
            "   ",
            "file:///etc/passwd",
            "ftp://h/x",
            "http://",
            "not a url at all",
        ] {
            let err = resolve(bad, None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{bad:?}");
        }
    }

    #[test]
    fn file_names_cannot_escape_or_break_the_directory() {
        let name = |u: &str| resolve(u, None).unwrap().file_name;
        assert_eq!(name("http://h/a/..%2F..%2Fetc%2Fpasswd"), "_.._etc_passwd");
        // The URL parser resolves an encoded `..`: `/a/%2e%2e` is `/`.
        assert_eq!(name("http://h/a/%2e%2e"), "download");
        assert_eq!(name("http://h/x/%2e%2e%2f"), "_");
        assert_eq!(name("http://h/"), "download");
        assert_eq!(name("http://h/dir/"), "download");
        assert_eq!(name("http://h/a%5Cb%00c.nii.gz"), "a_b_c.nii.gz");
        assert_eq!(name("http://h/meta.json"), "_meta.json");
        assert_eq!(name("http://h/.hidden.nii.gz"), "hidden.nii.gz");
        let long = format!("http://h/{}.nii.gz", "é".repeat(300));
        let n = name(&long);
        assert!(n.len() <= MAX_NAME_BYTES, "{}", n.len());
        assert!(n.ends_with(".nii.gz"));
        let long_ext = format!("http://h/a.{}", "x".repeat(500));
        assert!(name(&long_ext).len() <= MAX_NAME_BYTES);
        // Dots early in a long name do not cost it its extension.
        let dotted = format!("http://h/{}.nii.gz", "a.b".repeat(100));
        assert!(name(&dotted).ends_with(".nii.gz"), "{}", name(&dotted));
    }

    #[test]
    #[cfg(feature = "server")]
    fn paths_joined_below_the_server_never_name_another_host() {
        let b = base();
        for path in [
            "http:127.0.0.1:9/x",
            "https:127.0.0.1:9/x",
            "//127.0.0.1:9/x",
            "%68ttp:127.0.0.1:9/x",
            "file:/etc/passwd",
            "http:%2f%2f127.0.0.1:9/x",
            "http:\\\\127.0.0.1:9\\x",
            "ct/0042.nii.gz",
        ] {
            let url = below(&b, path, None).unwrap();
            assert_eq!(url.origin(), b.origin(), "{path}");
            assert!(url.path().starts_with("/data/"), "{path}: {url}");
        }
        let url = below(&b, "ct/a.nii.gz", Some("v=2")).unwrap();
        assert_eq!(
            url.as_str(),
            "http://images.example:8080/data/ct/a.nii.gz?v=2"
        );
        for escape in ["../x", "a/../../x", "%2e%2e/x", "a/%2E%2E/%2e%2e/x"] {
            let err = below(&b, escape, None).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{escape}");
        }
    }

    #[test]
    fn a_name_cut_to_length_never_ends_in_a_dot_or_a_space() {
        for filler in [".", " ", ". "] {
            // No suffix is kept (the last dot is too far from the end), so the cut falls in
            // the filler.
            let raw = format!(
                "{}{}{}",
                "a".repeat(MAX_NAME_BYTES - 1),
                filler.repeat(20),
                "b".repeat(40)
            );
            let name = sanitise(&raw);
            assert!(name.len() <= MAX_NAME_BYTES, "{}", name.len());
            assert!(!name.ends_with(['.', ' ']), "{name:?}");
            assert_eq!(sanitise(&name), name);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn sanitising_is_idempotent_and_bounded(raw in "\\PC{0,300}|[. a-z]{100,200}") {
            let name = sanitise(&raw);
            proptest::prop_assert_eq!(&sanitise(&name), &name);
            proptest::prop_assert!(name.len() <= MAX_NAME_BYTES);
            proptest::prop_assert!(!name.is_empty() && name != META_FILE);
            proptest::prop_assert!(!name.contains(['/', '\\', '\0']));
        }
    }

    #[test]
    fn base_is_normalised() {
        assert_eq!(base().as_str(), "http://images.example:8080/data/");
        assert_eq!(
            normalise_base("ftp://x").unwrap_err().kind(),
            ErrorKind::Config
        );
        assert_eq!(
            normalise_base("nope").unwrap_err().kind(),
            ErrorKind::Config
        );
    }

    #[test]
    fn keys_parse_only_well_formed_hex() {
        let k = resolve("http://h/a", None).unwrap().key;
        assert_eq!(Key::parse(k.as_str()), Some(k.clone()));
        assert_eq!(Key::parse("zz"), None);
        assert_eq!(Key::parse(&k.as_str().to_uppercase()), None);
    }
}

/// Property tests of what a caller (or a sidecar client) gives as a URL, and of keys read
/// back from file names: any text, no panic; a key is 64 lowercase hex digits.
#[cfg(test)]
mod outside_input {
    use proptest::prelude::*;

    use super::{Key, resolve};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_url_resolves_to_a_well_formed_key_or_an_error(input in "\\PC{0,120}|https?://[a-z.:0-9@%/?&=#-]{0,80}") {
            let base = url::Url::parse("http://images.example/data/").unwrap();
            for base in [None, Some(&base)] {
                if let Ok(r) = resolve(&input, base) {
                    prop_assert_eq!(Key::parse(r.key.as_str()), Some(r.key.clone()));
                }
            }
        }

        #[test]
        fn only_64_lowercase_hex_digits_are_a_key(text in "\\PC{0,70}|[0-9a-fA-F]{64}") {
            let ok = text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            prop_assert_eq!(Key::parse(&text).is_some(), ok);
        }
    }
}
