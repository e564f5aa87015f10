//! Request headers for an image server that wants a token or a key: given to the builder
//! (or by `CACHE_HTTP_HEADERS`, `CACHE_BEARER_TOKEN`, `CACHE_BEARER_TOKEN_FILE`), sent to the
//! image server's own origin only, and never shown: `Debug`, errors, logs, the dashboard and
//! the API name the headers, never their values.

use std::fmt;
use std::path::PathBuf;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

use crate::error::{Error, ErrorKind, Result};

/// A value that is never printed.
#[derive(Clone)]
pub(crate) struct Secret(pub(crate) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The headers as configured, before they are checked.
#[derive(Clone, Default, Debug)]
pub(crate) struct HeaderSettings {
    /// `(name, value)` in the order given; a later one of the same name replaces an earlier.
    pub(crate) headers: Vec<(String, Secret)>,
    pub(crate) bearer_token: Option<Secret>,
    pub(crate) bearer_token_file: Option<PathBuf>,
}

impl HeaderSettings {
    pub(crate) fn is_empty(&self) -> bool {
        self.headers.is_empty() && self.bearer_token.is_none() && self.bearer_token_file.is_none()
    }

    /// `CACHE_HTTP_HEADERS`: one `Name: value` a line (in a shell, `$'A: 1\nB: 2'`).
    pub(crate) fn parse_lines(name: &str, text: &str) -> Result<Vec<(String, Secret)>> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((header, value)) = line.split_once(':') else {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "{name}: line {} is not `Name: value` (its value is not shown)",
                        i + 1
                    ),
                ));
            };
            out.push((header.trim().to_owned(), Secret(value.trim().to_owned())));
        }
        Ok(out)
    }

    /// The headers to send, checked and marked sensitive (so that no `Debug` of a request
    /// shows them).
    pub(crate) fn build(&self) -> Result<HeaderMap> {
        let mut map = HeaderMap::new();
        for (name, value) in &self.headers {
            // The name is not echoed: a line split at the wrong colon may hold a secret.
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                Error::new(
                    ErrorKind::Config,
                    "a request header has a name that is not a valid HTTP header name (not shown)",
                )
            })?;
            map.insert(header.clone(), sensitive(&header, &value.0)?);
        }
        let token = match (&self.bearer_token, &self.bearer_token_file) {
            (Some(token), _) => Some(token.0.trim().to_owned()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        "cannot read the bearer token file (CACHE_BEARER_TOKEN_FILE)",
                    )
                    .with_path(path)
                    .with_source(e)
                })?;
                Some(text.trim().to_owned())
            }
            (None, None) => None,
        };
        if let Some(token) = token {
            if token.is_empty() {
                return Err(Error::new(ErrorKind::Config, "the bearer token is empty"));
            }
            map.insert(
                AUTHORIZATION,
                sensitive(&AUTHORIZATION, &format!("Bearer {token}"))?,
            );
        }
        Ok(map)
    }
}

fn sensitive(name: &HeaderName, value: &str) -> Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        Error::new(
            ErrorKind::Config,
            format!("the value of header {name} is not a valid HTTP header value (not shown)"),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_bad_ones_never_echo_their_value() {
        let parsed =
            HeaderSettings::parse_lines("CACHE_HTTP_HEADERS", "X-Api-Key: k1\n\n Accept : a/b ")
                .unwrap();
        let pairs: Vec<_> = parsed
            .iter()
            .map(|(n, v)| (n.as_str(), v.0.as_str()))
            .collect();
        assert_eq!(pairs, [("X-Api-Key", "k1"), ("Accept", "a/b")]);
        let err =
            HeaderSettings::parse_lines("CACHE_HTTP_HEADERS", "s3cr3t-without-colon").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let bad = HeaderSettings {
            headers: vec![("X-Key".into(), Secret("s3cr3t\nInjected: 1".into()))],
            ..Default::default()
        };
        let err = bad.build().unwrap_err();
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let bad_name = HeaderSettings {
            headers: vec![("X Key".into(), Secret("v".into()))],
            ..Default::default()
        };
        assert_eq!(bad_name.build().unwrap_err().kind(), ErrorKind::Config);
    }

    #[test]
    fn a_token_from_a_file_is_trimmed_and_marked_sensitive() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "tok-123\n").unwrap();
        let settings = HeaderSettings {
            bearer_token_file: Some(file),
            ..Default::default()
        };
        let map = settings.build().unwrap();
        assert_eq!(map[AUTHORIZATION], "Bearer tok-123");
        assert!(map[AUTHORIZATION].is_sensitive());
        assert!(!format!("{map:?}").contains("tok-123"));
        assert!(!format!("{settings:?}").contains("tok-123"));
        let empty = HeaderSettings {
            bearer_token: Some(Secret("  ".into())),
            ..Default::default()
        };
        assert_eq!(empty.build().unwrap_err().kind(), ErrorKind::Config);
    }
}
